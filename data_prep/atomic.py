"""Writes that are whole or absent: a killed process or a full disk never leaves half a file.

Every result file (manifests, summaries, checkpoints, cache metadata, tables) is written to a
temporary file in the same folder and moved over the target with :func:`os.replace`, which is
atomic on POSIX and Windows within one file system.  :func:`replace_together` does the same for
a set of files that belong together (manifest + dropped + summary): all are written first, then
moved in one go, so a failure while writing leaves the previous set untouched.

A full disk or a read-only folder raises :class:`WriteError` with one line naming the path.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping
from data_prep.errors import WorkbookError

_UMASK = os.umask(0)
os.umask(_UMASK)
#: Permissions of written files: what a plain open() would give (mkstemp alone gives 0600).
FILE_MODE = 0o666 & ~_UMASK

#: Test hook: called with the temporary path after it is written and before it replaces the
#: target (a test sets it to pause or kill the process at exactly that moment).
BEFORE_REPLACE: Callable[[Path], None] | None = None


class WriteError(WorkbookError, OSError):
    """A result file could not be written (disk full, no permission); the message names it."""


def _describe(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space or choose another output folder"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied or read-only folder; choose another output folder"
    return f"cannot write {path}: {error.strerror or error}"


def _is_write_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``, also when a library wrapped it (torch raises RuntimeError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        text = str(seen)
        if "No space left on device" in text or "error code: 28" in text:
            return OSError(errno.ENOSPC, "No space left on device")
        seen = seen.__cause__ or seen.__context__
    return None


def _temporary(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so the final rename is atomic), with the
    permissions a plain open() would give; :class:`WriteError` names ``path`` when that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteError(_describe(error, path)) from error
    os.close(fd)
    os.chmod(tmp_name, FILE_MODE)
    return Path(tmp_name)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces
    ``path`` atomically, else it is removed and ``path`` is left as it was.

    Raises :class:`WriteError` naming ``path`` when the disk is full or the folder not writable.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        if BEFORE_REPLACE is not None:
            BEFORE_REPLACE(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = _is_write_error(error) if isinstance(error, Exception) else None
        if cause is not None and not isinstance(error, WriteError):
            raise WriteError(_describe(cause, path)) from error
        raise


def write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_with(path: Path | str, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` to write the file (``DataFrame.to_csv``, ``torch.save``, ``np.save``
    with a file name), then move it over ``path``; return ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def replace_together(writers: Mapping[Path, Callable[[Path], None]]) -> list[Path]:
    """Write every file of a set to a temporary name first, then move them all into place, so
    either the whole new set is there or (on an error while writing) the old set is untouched.

    ``writers`` maps each target path to a function writing that file to the path it is given.
    The moves themselves are single renames, so only a kill between two renames (microseconds)
    can mix the sets.  Raises :class:`WriteError` naming the file that could not be written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, writer in writers.items():
            target = Path(target)
            tmp = _temporary(target)
            staged.append((tmp, target))
            try:
                writer(tmp)
            except Exception as error:
                cause = _is_write_error(error)
                if cause is not None:
                    raise WriteError(_describe(cause, target)) from error
                raise
        if BEFORE_REPLACE is not None:
            for tmp, _ in staged:
                BEFORE_REPLACE(tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [target for _, target in staged]
