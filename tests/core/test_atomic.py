import errno
import os
import stat
import subprocess
import sys

import pytest

from convobot.atomic import directory, write_json
from convobot.errors import SaveError


def test_directory_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "bundle"
    with directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (target / "a.txt").read_text() == "x"
    with pytest.raises(FileExistsError, match="overwrite"):
        with directory(target):
            pass
    with pytest.raises(RuntimeError):
        with directory(target, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp folder left
    assert not (target / "b.txt").exists()  # the old bundle is untouched


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with directory(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_a_killed_writers_temp_folder_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".bundle.{dead.pid}.abcd.tmp"
    (stale / "model.safetensors").parent.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".bundle.{os.getpid()}.efgh.tmp"  # a writer still at work: left alone
    live.mkdir()
    with directory(tmp_path / "bundle") as tmp:
        (tmp / "a.txt").write_text("x")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", live.name])


def test_released_files_read_like_any_other_whatever_wrote_them(tmp_path):
    old = os.umask(0o022)
    try:
        with directory(tmp_path / "bundle") as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes it
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "bundle" / "model.safetensors").stat().st_mode) == 0o644


def test_a_write_that_cannot_succeed_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SaveError, match="could not write file .*a_file/metrics.json"):
        write_json(tmp_path / "a_file" / "metrics.json", {})
    earlier = tmp_path / "bundle"
    earlier.mkdir()
    (earlier / "old.txt").write_text("kept")
    with pytest.raises(SaveError, match="could not write folder .*bundle: File too large"):
        with directory(earlier, overwrite=True):
            raise OSError(errno.EFBIG, "File too large")  # what a full disk or a size limit raises mid-save
    assert (earlier / "old.txt").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file", "bundle"]


def test_a_full_disk_leaves_no_half_written_file(tmp_path):
    """A real write past a file-size limit (RLIMIT_FSIZE, as a full disk would stop it), in a child process."""
    child = f"""
import resource, signal, sys
from convobot.atomic import write_text
from convobot.errors import SaveError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_text({str(tmp_path / 'big.txt')!r}, "x" * 100_000)
except SaveError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert "could not write file" in done.stdout and "big.txt" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_a_full_disk_under_safetensors_is_one_line_too(tmp_path):
    """safetensors reports write failures as its own error type, not OSError."""
    child = f"""
import resource, signal, torch
from safetensors.torch import save_file
from convobot.atomic import directory
from convobot.errors import SaveError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with directory({str(tmp_path / 'bundle')!r}) as tmp:
        save_file({{"w": torch.zeros(10_000)}}, tmp / "model.safetensors")
except SaveError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert "could not write folder" in done.stdout and "File too large" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []

