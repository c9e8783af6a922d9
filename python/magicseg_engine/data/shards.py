"""Crash-safe WebDataset shards for one run directory.

A generation run lasts days; it will be killed (OOM, preemption, Ctrl-C, power) and resumed,
and each resume must neither lose a finished sample nor write one twice. Layout:

    shards/{prefix}-{writer}-{seq:06d}.tar   POSIX tar, members `{key}.{ext}`, samples contiguous
    manifest.jsonl                           one line per finished shard:
                                             {"shard": name, "keys": [...], "bytes": n, "sha256": hex}
    .locks/writer-{writer}.lock              flock-ed by the live process writing as that writer id

A sample is finished when its shard has a complete line in manifest.jsonl and the shard file
matches that line's size and sha256. A shard is written in three steps; a kill can stop the
process between any two instructions, and each state it can leave is handled by the next load:

1. Members are streamed into `shards/.{name}.XXXXXXXX.tmp`. A kill leaves a temporary file:
   it is never read as data and the next load deletes it; its samples were not finished, so
   the caller generates them again.
2. The temporary file is fsynced, renamed to `shards/{name}` and the directory fsynced (the
   fsync comes first so that a power loss cannot leave the final name over missing data). A
   kill after the rename leaves a complete shard with no manifest line. The next load checks
   that it reads completely and appends its line ("recovery"), so its samples count as
   finished and are not generated again.
3. The line is appended with one os.write on an O_APPEND descriptor and fsynced. A kill inside
   the write leaves a torn last line (no newline). Loads and appends cut a torn tail off
   before reading or adding, under the manifest lock, so the shard is back in state 2.

The manifest line is written only after the shard is durable, so a listed key always has its
shard behind it; a listed shard that is missing or changed is reported, never trusted. A key is
never in two shards: a writer refuses keys the run already holds, and recovery lists a shard
at most once because it runs under the manifest lock.

Several processes may share one run directory if each uses its own writer id; their shard
names cannot clash. Each writer holds an flock on its lock file for its lifetime (the kernel
drops it when the process dies, however it dies). A load only recovers shards and deletes
temporary files of writers whose lock it can take, so it never touches the work of a live
writer. Manifest appends and repairs hold an flock on manifest.jsonl itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import signal
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from magicseg_engine.atomic import (
    DISK_ERRNOS,
    atomic_output,
    check_writable_dir,
    fault_point,
    fsync_dir,
    names_failed_writes,
    write_all,
)
from magicseg_engine.errors import UsageError

MANIFEST = "manifest.jsonl"
SHARDS_DIR = "shards"
LOCKS_DIR = ".locks"
DEFAULT_SAMPLES_PER_SHARD = 256  # ~30 MB of 512px pairs: a crash costs minutes of work, not hours

_NAME_PART = re.compile(r"^[A-Za-z0-9_]{1,32}$")  # no '-' or '.', so shard names parse back
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.', which WebDataset splits on
# Lower case because WebDataset lower-cases extensions when it groups members into samples.
_EXT = re.compile(r"^[a-z0-9][a-z0-9_]{0,15}(\.[a-z0-9][a-z0-9_]{0,15}){0,3}$")
_SHARD = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)-(?P<writer>[A-Za-z0-9_]+)-(?P<seq>[0-9]{6,})\.tar$")
# atomic_output names its temporary file `.{final name}.{random}.tmp` beside the final name.
_TEMP = re.compile(r"^\.(?P<shard>[^/]+\.tar)\.[^.]+\.tmp$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WRITER_LOCK_WAIT_S = 10.0  # a load holds another writer's lock only while it recovers its shards


class DuplicateKeyError(ValueError):
    """A key the run already holds was added again; callers filter with finished_keys()."""


def sample_key(model_id: str, prompt: str, negative_prompt: str, seed: int) -> str:
    """The key of one generation request: the same request always gives the same key."""
    # records pulls in pydantic; writer processes and readers do not need it at import time.
    from magicseg_engine.prompts.records import stable_hash

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    payload = {"model": model_id, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed}
    # 20 hex digits = 80 bits. By the birthday bound, 10^9 samples collide with probability
    # about n^2 / 2^81 < 10^-6; and a collision is refused (DuplicateKeyError) or reported by
    # the next load, never written as a silent overwrite.
    return stable_hash(payload, length=20)


# ---------------------------------------------------------------------------------------------
# Crash tests: MAGICSEG_SHARDS_CRASH_AT="<point>:<n>" makes the process SIGKILL itself the n-th
# time it reaches <point> (before_rename, before_manifest, mid_manifest). Unset in real runs.
_CRASH_ENV = "MAGICSEG_SHARDS_CRASH_AT"
_crash_counts: dict[str, int] = {}


def _crash_requested(point: str) -> bool:
    return os.environ.get(_CRASH_ENV, "").partition(":")[0] == point


def _crash_point(point: str) -> None:
    if not _crash_requested(point):
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(os.environ[_CRASH_ENV].partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    """One manifest line: a finished shard, its keys in file order, its size and sha256."""

    name: str
    keys: tuple[str, ...]
    bytes: int
    sha256: str

    def line(self) -> bytes:
        obj = {"shard": self.name, "keys": list(self.keys), "bytes": self.bytes, "sha256": self.sha256}
        return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")

    @classmethod
    def parse(cls, line: bytes) -> ShardInfo:
        """Parse one manifest line; ValueError says what is wrong with it."""
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        name, keys, size, digest = obj.get("shard"), obj.get("keys"), obj.get("bytes"), obj.get("sha256")
        if not isinstance(name, str) or not _SHARD.match(name):
            raise ValueError(f"bad shard name {name!r}")
        if not isinstance(keys, list) or not all(isinstance(k, str) and _KEY.match(k) for k in keys):
            raise ValueError("'keys' must be a list of sample keys")
        if len(set(keys)) != len(keys):
            # A shard never holds a key twice (the writer refuses it), so the line was edited.
            twice = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise ValueError(f"'keys' lists sample {twice} twice")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("'bytes' must be a non-negative integer")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError("'sha256' must be 64 lower-case hex digits")
        return cls(name, tuple(keys), size, digest)


def _write_line(fd: int, line: bytes, path: Path) -> None:
    """Append one manifest line and make it durable. The caller holds the manifest lock.

    A full disk can take part of the line and refuse the rest: the torn tail is cut off by the
    next load, and the shard, already in place, is listed again by its recovery."""
    if _crash_requested("mid_manifest"):  # crash tests: tear the line in two
        os.write(fd, line[: len(line) // 2])
        _crash_point("mid_manifest")
        line = line[len(line) // 2:]
    # One write, so concurrent O_APPEND writers cannot interleave (they hold the manifest lock
    # too); a short write, which only a full disk gives, is finished by write_all.
    write_all(fd, line, site="manifest", path=path)
    with names_failed_writes(path):
        os.fsync(fd)


def _cut_torn_tail(fd: int) -> None:
    """Drop bytes after the last newline: a line whose write was killed half way.

    The caller holds the manifest lock, so no live process is in the middle of a write.
    """
    size = end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        os.ftruncate(fd, end)
        os.fsync(fd)


@contextlib.contextmanager
def _locked_manifest(run_dir: Path) -> Iterator[int]:
    """The manifest opened for reading and appending, flock-ed, with any torn tail cut off."""
    try:
        fd = os.open(run_dir / MANIFEST, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        path = run_dir / MANIFEST
        if err.errno in DISK_ERRNOS:  # full or failing disk: reported as such by the caller
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise UsageError(f"cannot update {path}: {err.strerror}; make the run directory writable") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _cut_torn_tail(fd)
        yield fd
    finally:
        os.close(fd)  # also releases the flock


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 24, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse_manifest(data: bytes, path: Path) -> list[ShardInfo]:
    """All complete lines; a torn last line (no newline) is ignored, any other bad line reported."""
    lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn or empty
    entries: list[tuple[int, ShardInfo]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append((lineno, ShardInfo.parse(line)))
        except ValueError as err:
            raise UsageError(
                f"{path} line {lineno} is not a shard entry ({err}); restore the manifest from a "
                "copy or delete that line and the shard it names, whose samples are then generated again"
            ) from None
    _check_unique(entries, path)
    return [entry for _, entry in entries]


def _check_unique(entries: list[tuple[int, ShardInfo]], path: Path) -> None:
    """Each shard listed once, each key in one shard; a refusal names both lines."""
    owner: dict[str, tuple[int, str]] = {}
    names: dict[str, int] = {}
    for lineno, entry in entries:
        if entry.name in names:
            raise UsageError(f"{path} line {lineno} lists shard {entry.name} again (first on line "
                             f"{names[entry.name]}); delete one of the two lines")
        names[entry.name] = lineno
        for key in entry.keys:
            if key in owner:
                first, shard = owner[key]
                raise UsageError(
                    f"{path} line {lineno} lists sample {key} of {entry.name}, which line {first} lists in "
                    f"{shard}; delete the line of one of the two shards and that shard"
                )
            owner[key] = (lineno, entry.name)


# ---------------------------------------------------------------------------------------------
# Shard files


def _sha256_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _scan_shard(path: Path) -> list[str]:
    """Keys of a shard that reads completely; ValueError says why it does not.

    Complete means: every member is a regular `{key}.{ext}` file whose data is all there, the
    members of a sample are contiguous, every sample has the same extensions, and the archive
    ends with tar's end-of-archive zero blocks (a file cut at a member boundary lacks them).
    """
    keys: list[str] = []
    exts: dict[str, set[str]] = {}
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    key, ext = _split_member(member)
                    if not keys or keys[-1] != key:
                        if key in exts:
                            raise ValueError(f"members of sample {key} are not contiguous")
                        keys.append(key)
                        exts[key] = set()
                    if ext in exts[key]:
                        raise ValueError(f"{member.name} appears twice")
                    exts[key].add(ext)
                    if len(tar.extractfile(member).read()) != member.size:
                        raise ValueError(f"{member.name} is cut short")
                end = tar.offset
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"not a readable tar file: {err}") from None
        f.seek(end)
        trailer = f.read()
    if len(trailer) < 2 * tarfile.BLOCKSIZE or trailer.strip(b"\0"):
        raise ValueError("the end-of-archive marker is missing, so the file is cut short")
    if not keys:
        raise ValueError("it holds no samples")
    if len({frozenset(e) for e in exts.values()}) != 1:
        raise ValueError("its samples do not all have the same files")
    return keys


def _split_member(member: tarfile.TarInfo) -> tuple[str, str]:
    key, dot, ext = member.name.partition(".")
    if not member.isreg() or not dot or not _KEY.match(key) or not _EXT.match(ext):
        raise ValueError(f"unexpected member {member.name!r}")
    return key, ext


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A member with fixed metadata, so that the same samples give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


class _HashingFile:
    """Passes writes through while counting and hashing them: the shard is never read back."""

    def __init__(self, f, path: Path) -> None:
        self._f = f
        self._path = path  # the shard's final name: disk errors name it
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        with names_failed_writes(self._path):
            fault_point("shard_data", self._path)
            self._f.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


# ---------------------------------------------------------------------------------------------
# Locks


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _writer_lock_path(run_dir: Path, writer_id: str) -> Path:
    locks = run_dir / LOCKS_DIR
    locks.mkdir(exist_ok=True)
    return locks / f"writer-{writer_id}.lock"


def _acquire_writer_lock(run_dir: Path, writer_id: str) -> int:
    deadline = time.monotonic() + _WRITER_LOCK_WAIT_S
    path = _writer_lock_path(run_dir, writer_id)
    while (fd := _try_lock(path)) is None:
        if time.monotonic() > deadline:
            raise UsageError(
                f"another process is writing to {run_dir} as writer {writer_id!r}; "
                "give each process its own writer id"
            )
        time.sleep(0.05)
    return fd


# ---------------------------------------------------------------------------------------------
# Run state


@dataclass(frozen=True)
class RunState:
    """The finished shards of a run directory, after repairing what a crash left behind."""

    run_dir: Path
    shards: tuple[ShardInfo, ...] = ()
    finished: frozenset[str] = frozenset()
    recovered: tuple[str, ...] = ()  # shards whose manifest line this load appended
    removed: tuple[str, ...] = ()  # temporary files this load deleted
    skipped_writers: tuple[str, ...] = ()  # live writers whose files were left alone

    @classmethod
    def load(cls, run_dir: Path | str, *, verify: bool = True, repair: bool = True) -> RunState:
        """Read the manifest, repair crash leftovers (`repair`), check the listed shards.

        verify=True compares every listed shard with its sha256 (reads all data); otherwise
        only existence and size are checked. repair=False reads without locking or changing
        anything (a read-only copy, or a look at a run in progress): a torn last line is
        skipped, unlisted shards are not finished and temporary files are left alone.
        Raises UsageError for a listed shard that is missing or differs from its line.
        """
        return _load(Path(run_dir), own_writer=None, verify=verify, repair=repair)

    def next_seq(self, writer_id: str) -> int:
        """The sequence number after the last shard of `writer_id` listed or present."""
        seqs = [int(m["seq"]) for m in map(_SHARD.match, self._names()) if m and m["writer"] == writer_id]
        return max(seqs, default=-1) + 1

    def _names(self) -> list[str]:
        shards_dir = self.run_dir / SHARDS_DIR
        present = os.listdir(shards_dir) if shards_dir.is_dir() else []
        return [s.name for s in self.shards] + present


def finished_keys(run_dir: Path | str, *, verify: bool = True) -> frozenset[str]:
    """Keys of the samples a run has finished; generate only the others."""
    return RunState.load(run_dir, verify=verify).finished


@dataclass
class _Repairs:
    """What a load changed on disk, and which live writers it left alone."""

    recovered: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _load(run_dir: Path, *, own_writer: str | None, verify: bool, repair: bool) -> RunState:
    if not run_dir.exists():
        return RunState(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run path {run_dir} is not a directory; choose another path")
    repaired = _Repairs()
    if repair:
        with _locked_manifest(run_dir) as fd:
            entries = _parse_manifest(_read_all(fd), run_dir / MANIFEST)
            repaired = _repair_shards(run_dir, entries, fd, own_writer)
    else:
        path = run_dir / MANIFEST
        entries = _parse_manifest(path.read_bytes(), path) if path.exists() else []
    _check_listed(run_dir, entries, verify)
    finished = frozenset(k for e in entries for k in e.keys)
    return RunState(
        run_dir, tuple(entries), finished,
        tuple(repaired.recovered), tuple(repaired.removed), tuple(repaired.skipped),
    )


def _leftovers(run_dir: Path, listed: set[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per writer id: its temporary files and its shards that the manifest does not list."""
    shards_dir = run_dir / SHARDS_DIR
    found: dict[str, tuple[list[str], list[str]]] = {}
    for name in sorted(os.listdir(shards_dir)) if shards_dir.is_dir() else []:
        temp = _TEMP.match(name)
        shard = _SHARD.match(temp["shard"] if temp else name)
        if shard is None or (not temp and name in listed):
            continue
        temps, unlisted = found.setdefault(shard["writer"], ([], []))
        (temps if temp else unlisted).append(name)
    return found


def _repair_shards(run_dir: Path, entries: list[ShardInfo], fd: int, own_writer: str | None) -> _Repairs:
    """Delete temporary files and list unlisted shards, for writers that are not running.

    Appends the recovered shards to `entries`. The caller holds the manifest lock (`fd`).
    """
    done = _Repairs()
    for writer_id, (temps, unlisted) in _leftovers(run_dir, {e.name for e in entries}).items():
        lock = None
        if writer_id != own_writer:
            lock = _try_lock(_writer_lock_path(run_dir, writer_id))
            if lock is None:  # a live writer: its temporary files and shards are in progress
                done.skipped.append(writer_id)
                continue
        try:
            for name in temps:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(run_dir / SHARDS_DIR / name)
                done.removed.append(name)
            for name in unlisted:
                entries.append(_recover(run_dir, name, entries, fd))
                done.recovered.append(name)
        finally:
            if lock is not None:
                os.close(lock)
    if done.removed:
        fsync_dir(run_dir / SHARDS_DIR)
    return done


def _recover(run_dir: Path, name: str, entries: list[ShardInfo], fd: int) -> ShardInfo:
    """List a shard that was renamed into place by a process killed before its manifest line."""
    path = run_dir / SHARDS_DIR / name
    try:
        keys = _scan_shard(path)
    except ValueError as err:
        raise UsageError(
            f"shard {path} is not in {MANIFEST} and does not read as a complete shard ({err}); "
            "delete it and run again, its samples are then generated again"
        ) from None
    listed = {k for e in entries for k in e.keys}
    if listed.intersection(keys):
        raise UsageError(
            f"shard {path} is not in {MANIFEST} and holds samples that listed shards already hold; "
            "delete it and run again"
        )
    size, digest = _sha256_file(path)
    info = ShardInfo(name, tuple(keys), size, digest)
    _write_line(fd, info.line(), run_dir / MANIFEST)
    return info


def _check_listed(run_dir: Path, entries: list[ShardInfo], verify: bool) -> None:
    problems = [p for p in (_listed_problem(run_dir, e, verify) for e in entries) if p]
    if problems:
        more = f" ({len(problems) - 1} more shards have problems)" if len(problems) > 1 else ""
        raise UsageError(
            f"{problems[0]}{more}; restore the shard from a copy, or delete its line from "
            f"{run_dir / MANIFEST} so that its samples are generated again"
        )


def _listed_problem(run_dir: Path, entry: ShardInfo, verify: bool) -> str | None:
    path = run_dir / SHARDS_DIR / entry.name
    where = f"shard {path} listed in {MANIFEST}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{where} is missing"
    if size != entry.bytes:
        return f"{where} has {size} bytes, not the {entry.bytes} its line records"
    if verify and _sha256_file(path)[1] != entry.sha256:
        return f"{where} does not match its sha256: the file changed or is corrupted"
    return None


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Write samples into shards of a run directory; see the module docstring for the protocol.

    Use as a context manager, or call close(): samples added since the last full shard are in
    no shard until then. Each process sharing a run directory needs its own writer_id.
    """

    def __init__(
        self,
        run_dir: Path | str,
        samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
        writer_id: str = "0",
        *,
        prefix: str = "magicseg",
        verify: bool = True,
    ) -> None:
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
        for what, value in (("writer_id", writer_id), ("prefix", prefix)):
            if not isinstance(value, str) or not _NAME_PART.match(value):
                raise UsageError(f"{what} {value!r} must be 1-32 letters, digits or '_'; choose another")
        self.run_dir = Path(run_dir)
        self.samples_per_shard = samples_per_shard
        self.writer_id = writer_id
        self.prefix = prefix
        self.written: list[ShardInfo] = []  # shards this writer finished, in order
        check_writable_dir(self.run_dir / SHARDS_DIR)
        self._lock: int | None = _acquire_writer_lock(self.run_dir, writer_id)
        try:
            state = _load(self.run_dir, own_writer=writer_id, verify=verify, repair=True)
        except BaseException:
            self._release()
            raise
        self.state = state
        self._taken = set(state.finished)  # finished keys plus keys added by this writer
        self._seq = state.next_seq(writer_id)
        self._shard: _OpenShard | None = None
        self._failed = False

    def add(self, key: str, files: Mapping[str, bytes]) -> None:
        """Add one sample: `files` maps extensions ("pos.jpg", "json", ...) to their bytes."""
        if self._lock is None or self._failed:
            raise ValueError("this ShardWriter is closed" if self._lock is None else "this ShardWriter failed")
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"bad sample key {key!r}: 1-64 letters, digits, '_' or '-'")
        if key in self._taken:
            raise DuplicateKeyError(f"sample {key} is already in {self.run_dir}; filter with finished_keys()")
        members = _members(key, files)
        if self._shard is None:
            self._shard = _OpenShard(self._shard_path())
        self._shard.check(key, members)
        try:
            self._shard.add(key, members)
        except BaseException:
            self._fail()
            raise
        self._taken.add(key)
        if len(self._shard.keys) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> ShardInfo | None:
        """Finish the current shard, however few samples it holds. Returns its manifest entry."""
        shard, self._shard = self._shard, None
        if shard is None:
            return None
        try:
            info = shard.finish()
            _crash_point("before_manifest")
            with _locked_manifest(self.run_dir) as fd:
                _write_line(fd, info.line(), self.run_dir / MANIFEST)
        except BaseException:
            self._fail(shard)
            raise
        self._seq += 1
        self.written.append(info)
        return info

    def close(self) -> None:
        """Write the pending samples and let other processes repair this writer's files."""
        try:
            if self._lock is not None and not self._failed:
                self.flush()
        finally:
            self._release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Samples added before the error are complete: keep them if that still works, and
        # let the error that ended the block be the one the caller sees.
        with contextlib.suppress(Exception):
            self.close()

    def _shard_path(self) -> Path:
        path = self.run_dir / SHARDS_DIR / f"{self.prefix}-{self.writer_id}-{self._seq:06d}.tar"
        if path.exists():  # cannot happen while this writer holds its lock; never overwrite
            raise RuntimeError(f"{path} already exists")
        return path

    def _fail(self, shard: _OpenShard | None = None) -> None:
        """After an error the shard's samples are in no shard: resuming generates them again."""
        self._failed = True
        shard = shard or self._shard
        self._shard = None
        if shard is not None:
            shard.discard()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _members(key: str, files: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """(member name, data) sorted by extension, so the bytes do not depend on dict order."""
    if not files:
        raise ValueError(f"sample {key} has no files")
    members = []
    for ext, data in sorted(files.items()):
        if not isinstance(ext, str) or not _EXT.match(ext):
            raise ValueError(f"bad extension {ext!r} in sample {key}: lower-case, like 'pos.jpg' or 'json'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{key}.{ext} must be bytes, got {type(data).__name__}")
        members.append((f"{key}.{ext}", bytes(data)))
    return members


class _OpenShard:
    """A shard being streamed into its temporary file (state 1 of the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: list[str] = []
        self._exts: tuple[str, ...] | None = None
        self._stack = contextlib.ExitStack()
        self._file = _HashingFile(self._stack.enter_context(atomic_output(path, "wb", site="shard_commit")), path)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def check(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Refuse a sample whose files differ from the shard's first: loaders and the
        recovery check rely on every sample of a shard having the same files."""
        exts = tuple(name.partition(".")[2] for name, _ in members)
        if self._exts is not None and exts != self._exts:
            raise ValueError(f"sample {key} has files {exts}, the others in this shard {self._exts}")

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        self._exts = tuple(name.partition(".")[2] for name, _ in members)
        for name, data in members:
            self._tar.addfile(*_tar_member(name, data))
        self.keys.append(key)

    def finish(self) -> ShardInfo:
        """Write the end-of-archive, fsync, rename into place, fsync the directory (state 2)."""
        self._tar.close()
        _crash_point("before_rename")
        self._stack.close()  # atomic_output: flush, fsync, os.replace, fsync the directory
        return ShardInfo(self.path.name, tuple(self.keys), self._file.size, self._file.digest.hexdigest())

    def discard(self) -> None:
        """Delete the temporary file (atomic_output removes it when it sees an exception)."""
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("shard discarded"), None)


# ---------------------------------------------------------------------------------------------
# Reading


def shard_paths(run_dir: Path | str, *, verify: bool = True) -> list[Path]:
    """Paths of the finished shards, in manifest order."""
    state = RunState.load(run_dir, verify=verify, repair=False)
    return [state.run_dir / SHARDS_DIR / s.name for s in state.shards]


def shard_sha256(path: Path | str) -> str:
    """The sha256 of a shard file, as its manifest line records it."""
    return _sha256_file(Path(path))[1]


def iter_shard(path: Path | str, keys: tuple[str, ...] | None = None) -> Iterator[dict]:
    """The samples of one shard file, as `iter_samples` gives them.

    A shard that cannot be read to its end, holds the members of one sample apart (the writer
    keeps them together; a reader would see two half samples), or, when its manifest line's
    `keys` are given, holds other samples than those, raises UsageError naming the shard: a
    reader stops there rather than use a part of it.
    """
    import webdataset as wds  # imports torch: only readers pay for it

    path = Path(path)
    fix = (f"restore it from a copy, or delete its line from {MANIFEST} so that its samples are "
           "generated again")
    seen: list[str] = []
    seen_set: set[str] = set()
    try:
        for sample in wds.WebDataset([str(path)], shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            if key in seen_set:
                raise UsageError(f"shard {path}: the files of sample {key} are not together, so it reads as "
                                 f"two incomplete samples; {fix}")
            if keys is not None and (len(seen) >= len(keys) or keys[len(seen)] != key):
                break
            seen.append(key)
            seen_set.add(key)
            yield sample
    except UsageError:
        raise
    except Exception as err:  # tarfile, webdataset and decoding errors alike mean a damaged file
        raise UsageError(f"shard {path} cannot be read ({_why(err)}); {fix}") from None
    if keys is not None and tuple(seen) != tuple(keys):
        raise UsageError(f"shard {path} does not hold the samples its {MANIFEST} line lists (sample "
                         f"{len(seen) + 1} of {len(keys)} is missing or another); {fix}")


def _why(err: BaseException) -> str:
    """A short reason for a read error: tarfile packs file objects into its arguments."""
    text = str(err.args[0]) if err.args else type(err).__name__
    text = text.split(" @ ")[0]
    return f"{type(err).__name__}: {text[:200]}"


def sample_meta(sample: Mapping, shard: Path | str | None = None) -> dict:
    """A sample's `json` member as a dict with a list of class names; UsageError naming the
    sample and its shard when it is missing or damaged."""
    where = f"sample {sample.get('__key__')} in shard {shard or sample.get('__url__', '?')}"
    data = sample.get("json")
    try:
        meta = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):  # not JSON or not UTF-8
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not meta["classes"] \
            or not all(isinstance(c, str) for c in meta["classes"]):
        raise UsageError(f"{where} has no readable JSON with its class names; restore the shard from a copy, or "
                         f"delete its line from {MANIFEST} so that its samples are generated again")
    return meta


def iter_samples(run_dir: Path | str, *, verify: bool = True) -> Iterator[dict]:
    """Samples of the finished shards, in manifest order, read with WebDataset.

    Each is a dict with one bytes value per extension ("pos.jpg", "json", ...), "__key__",
    and WebDataset's other bookkeeping entries (names in double underscores, like "__url__").
    Shards being written and unlisted shards are not read; nothing on disk is changed. A
    listed shard that is damaged stops the reading with UsageError naming it (`iter_shard`).
    """
    state = RunState.load(run_dir, verify=verify, repair=False)
    for shard in state.shards:
        yield from iter_shard(state.run_dir / SHARDS_DIR / shard.name, shard.keys)
