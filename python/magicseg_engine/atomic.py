"""Write files so that a reader sees either nothing or the whole file, even after a crash.

Every place the package writes a file has a stable name in `WRITE_SITES`. A write that fails
because the disk is full or broken (`DISK_ERRNOS`) raises OSError naming the file it was
writing, so the command line can say which file, on which file system, and what to do
(`disk_space.describe_write_error`). Tests make the n-th write at one site fail through
`MAGICSEG_FAULT_AT` (see `fault_point`); the variable is unset in real runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from magicseg_engine.errors import UsageError

# Where files are written, by the name the fault hook and the tests use. A site is one kind of
# write; "per file" sites fail as the file is committed (after its data went to the temporary
# file, as a full disk often shows itself only at flush or fsync), append sites part-way
# through a line, stream sites at one write of the stream.
WRITE_SITES: dict[str, str] = {
    # a run folder (generate, masks)
    "run_file": "run.json: a run's start, its balance record, each session's summary (per file)",
    "prompts": "prompts.jsonl of a run, and the output of `prompts` (per file)",
    "shard_data": "a shard's tar stream, written into its temporary file (per write of the stream)",
    "shard_commit": "a shard's flush, fsync and rename into place (per shard)",
    "manifest": "a line appended to manifest.jsonl (per line)",
    "dropped": "a line appended to dropped.jsonl (per line)",
    # pretrain
    "pretrain_config": "pretrain.json of a pretraining run (per file)",
    "metrics": "a line appended to a pretraining run's metrics.jsonl, and its rewrite on resume (per line or file)",
    "checkpoint": "a pretraining checkpoint (per file)",
    "text_cache": "the text-embedding cache of pretrain (per file)",
    # export
    "export_data": "an export's per-pair files, per-shard parts and parquet files (per file)",
    "export_ledger": "an export's ledger of finished shards (per file)",
    "export_final": "an export's final files: instances.json, classes.txt, the saved dataset, export.json (per file)",
    # report and prompts
    "report": "the HTML page of `report` (per file)",
    "llm_cache": "a line appended to the LLM reply cache (per line)",
    # everything else written whole through atomic_output: configuration copies, --json results,
    # evaluate's outputs, world and SAM training states and weights, engines and their records
    "output": "any other file written whole through atomic_output (per file)",
}

# Errors of the disk rather than of the request: reported in one line with what to do
# (free space, check the disk), never as a usage error.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})

FAULT_ENV = "MAGICSEG_FAULT_AT"
_FAULT_ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EDQUOT": errno.EDQUOT, "EROFS": errno.EROFS}
_fault_lock = threading.Lock()  # the writer thread and the main thread both reach fault points
_fault_seen: dict[str, int] = {}  # hits per site under the current spec
_fault_spec = [""]


def _parse_fault(spec: str) -> tuple[str, int, int]:
    site, _, rest = spec.partition(":")
    name, _, nth = rest.partition(":")
    if site not in WRITE_SITES or name not in _FAULT_ERRNOS or not (nth or "1").isdigit() or int(nth or 1) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected SITE:ERRNO[:N] with SITE one of {', '.join(WRITE_SITES)}, "
                         f"ERRNO one of {', '.join(_FAULT_ERRNOS)}, N >= 1")
    return site, _FAULT_ERRNOS[name], int(nth or 1)


def _fault_due(site: str) -> int | None:
    """The errno to fail with if this is the write `MAGICSEG_FAULT_AT` names, else None."""
    if site not in WRITE_SITES:
        raise ValueError(f"unknown write site {site!r}; add it to WRITE_SITES")
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    target, code, nth = _parse_fault(spec)
    with _fault_lock:
        if spec != _fault_spec[0]:  # a new spec counts from zero (tests set several in one process)
            _fault_spec[0] = spec
            _fault_seen.clear()
        if target != site:
            return None
        _fault_seen[site] = _fault_seen.get(site, 0) + 1
        return code if _fault_seen[site] == nth else None


def fault_error(code: int, path: Path | str) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def fault_point(site: str, path: Path | str) -> None:
    """Test hook: MAGICSEG_FAULT_AT="<site>:<ENOSPC|EIO|EDQUOT|EROFS>[:<n>]" makes the n-th (default:
    the first) write at `site` in this process raise OSError with that errno, as a full or failing
    disk would. Only that one write fails; a spec counts again from zero when the variable changes."""
    code = _fault_due(site)
    if code is not None:
        raise fault_error(code, path)


def reset_faults() -> None:
    """Count fault hits from zero again (for tests that reuse one spec)."""
    with _fault_lock:
        _fault_seen.clear()
        _fault_spec[0] = ""


@contextlib.contextmanager
def names_failed_writes(path: Path | str, *also: str) -> Iterator[None]:
    """Put `path` into disk errors raised inside the block that name no file (os.write and fsync
    do not), or that name one of `also` (a temporary file stands for the file it becomes)."""
    try:
        yield
    except OSError as err:
        if err.errno in DISK_ERRNOS and (err.filename is None or err.filename in also):
            err.filename = str(path)
        raise


def write_all(fd: int, data: bytes, *, site: str, path: Path | str) -> None:
    """Write all of `data` to `fd` (a short write, which a nearly full disk gives, is continued).

    The fault hook fails this write after half of it, as a disk that fills part-way through a
    line does: the readers of append-only logs must cope with a torn last line."""
    with names_failed_writes(path):
        code = _fault_due(site)
        if code is not None:
            os.write(fd, data[: len(data) // 2])
            raise fault_error(code, path)
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])


def append_text(f, text: str, *, site: str, path: Path | str) -> None:
    """Append `text` to the open text file `f` and flush it; the fault hook tears it like `write_all`."""
    with names_failed_writes(path):
        code = _fault_due(site)
        if code is not None:
            f.write(text[: len(text) // 2])
            f.flush()
            raise fault_error(code, path)
        f.write(text)
        f.flush()


def write_file(path: Path, data: bytes, *, site: str) -> None:
    """Write `data` to `path` in place: for files a resumed command writes again whole anyway
    (an export's per-pair files), where a temporary file and an fsync each would buy nothing."""
    with names_failed_writes(path):
        fault_point(site, path)
        Path(path).write_bytes(data)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; outputs get the usual permissions.
_FILE_MODE = 0o666 & ~_current_umask()


def check_writable_dir(path: Path) -> None:
    """Create `path` if needed; raise UsageError if it cannot hold new files.

    A full or failing disk is not the user's choice of path: its OSError is raised as it is. A
    read-only file system is: a folder cannot be made there, so another path is the answer."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in DISK_ERRNOS and err.errno != errno.EROFS:
            raise
        raise UsageError(f"cannot create output directory {path}: {err.strerror}; choose a writable path") from None
    if not path.is_dir():
        raise UsageError(f"output path {path} is not a directory; choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path} is not writable; choose a writable path")


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "w", encoding: str | None = "utf-8", *, site: str = "output") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. `site` names
    the write for the fault hook (`WRITE_SITES`); disk errors name `path`.
    """
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    tmp = None
    try:
        with names_failed_writes(path):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with names_failed_writes(path, tmp):
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
                yield f
                fault_point(site, path)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, site: str = "output") -> None:
    with atomic_output(path, site=site) as f:
        f.write(text)


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
