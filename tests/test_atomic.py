import os
import stat

import pytest

from convobot.atomic import directory, write_json


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
