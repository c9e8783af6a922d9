"""One command at a time writes a run directory.

Two `generate` (or `masks`) processes started on one directory by mistake would each decide
what is finished, render the same pairs and race on run.json; an `--overwrite` could delete the
shards the other is writing. So a command that writes a run holds an exclusive flock on the
directory itself for its whole life, taken before it reads anything, and a second one is refused
at once, before it loads a model.

The lock is on the directory's own file descriptor, not on a file inside it: a lock file would
make a new directory non-empty (which `open_run` reads as "holds something") and would be
deleted by `--overwrite` while held. The kernel drops the lock when the process dies, however it
dies, so a killed run never leaves a stale lock behind. Ray workers write the same directory
under the driver's lock with writer locks of their own (data/shards.py); they do not take this one.
flock on a directory works on local filesystems; on NFS, Linux maps it to a byte-range lock, which
needs the directory opened for writing and fails; there the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from magicseg_engine.atomic import check_writable_dir
from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_directory_lock(out: Path, flag: str = "--out") -> Iterator[None]:
    """Hold the run in `out` for this process; refuse if another process holds it.

    Creates `out` (refusing a path that is a file or cannot be written), so the lock can be
    taken before the run is read. A directory this call created and nothing filled is removed
    again on release, so a refused or failed command leaves no trace.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a directory; choose a directory for the run")
    created = not out.exists()
    check_writable_dir(out)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(out)
            who = f"process {holder}" if holder is not None else "another process"
            raise UsageError(f"{who} is writing the run in {out}; wait for it to end (or stop it) before running "
                             f"another command on that directory, or choose another {flag}") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            log.warning("cannot lock %s on this filesystem (%s); make sure no other command writes it at the "
                        "same time", out, err.strerror)
        yield
    finally:
        os.close(fd)  # also releases the flock
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds while empty


def _holder_pid(path: Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (Linux); None where it cannot be told."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"; blocked waiters carry "->".
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError, IndexError):
            if int(fields[5].rsplit(":", 1)[1]) == inode:
                return int(fields[4])
    return None
