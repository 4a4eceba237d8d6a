"""Atomic writes: an interrupted run never leaves a half-written file or folder behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from convobot.errors import OutputExistsError, SaveError, UserError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _temp_prefix(path: Path) -> str:
    """Temp names carry the writer's PID, so a later writer can tell a killed one's leftovers from a live one's."""
    return f".{path.name}.{os.getpid()}."


def remove_stale(path: Path) -> list[Path]:
    """Remove the temp files and folders that writers of `path` left behind when they were killed."""
    removed = []
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        pid = stale.name[len(Path(path).name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# The errors of a write that cannot succeed: no space, no permission, something in the way.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST}


@contextmanager
def saving(path: Path, what: str) -> Iterator[None]:
    """A failed write (disk full, read-only, a file where a folder should be) as one line naming the path."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as err:
        if isinstance(err, UserError) or err.errno not in WRITE_ERRNOS:
            raise
        raise SaveError(f"could not write {what} {path}: {err.strerror or err}") from err
    except SafetensorError as err:  # safetensors reports its own I/O errors (disk full: "File too large", ...)
        if "I/O error" not in str(err):
            raise
        raise SaveError(f"could not write {what} {path}: {str(err).split('I/O error: ', 1)[-1]}") from err


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    with saving(path, "file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a released file should read like any other
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """A command checks its output path before the work, not only when it comes to write."""
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass overwrite=true to replace it)")


def _readable_by_all(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, whatever the library that wrote them chose (safetensors: 0600)."""
    umask = _umask()
    for item in [folder, *folder.rglob("*")]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it is renamed to `path`, on error removed. A killed
    writer's temp folder is removed by the next writer of `path`."""
    path = Path(path)
    refuse_overwrite(path, overwrite)
    with saving(path, "folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        with saving(path, "folder"):
            yield tmp
            _readable_by_all(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def files_into(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside the folder `path`; on success each file in it replaces (or joins) the file of the
    same name in `path`, one atomic rename each, and files already in `path` stay; on error nothing changes. A new
    `path` is written whole, as `directory` writes it."""
    path = Path(path)
    if not path.is_dir():
        with directory(path) as tmp:
            yield tmp
        return
    with saving(path, "folder"):
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        with saving(path, "folder"):
            yield tmp
            _readable_by_all(tmp)
            for item in sorted(tmp.iterdir()):
                os.replace(item, path / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
