"""Write files so that a reader sees either nothing or the whole file, even after a crash."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from magicseg_engine.errors import UsageError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; outputs get the usual permissions.
_FILE_MODE = 0o666 & ~_current_umask()


def check_writable_dir(path: Path) -> None:
    """Create `path` if needed; raise UsageError if it cannot hold new files."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output directory {path}: {err.strerror}; choose a writable path") from None
    if not path.is_dir():
        raise UsageError(f"output path {path} is not a directory; choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path} is not writable; choose a writable path")


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text)


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
