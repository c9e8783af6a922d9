"""Disk space: what a run will still write, the check before a long run, and the one line a
command prints when the disk fills or fails under it.

A run's pairs are estimated from its own finished shards when it has some (their bytes per
pair, tar padding and manifest lines included), else from its settings: two JPEGs, a label map
and attention maps of the preset's image size, its metadata, and tar's overhead. The settings'
estimate is meant to err high for real photographs (about 0.75 bytes a pixel per JPEG at
quality 95, where photographs usually take 0.3-0.5) and is close for the tiny preset's noisy
images; tests hold it between 0.8 and 2 times what a tiny run writes (under only by the tar
padding of a last, short shard, which the reserve covers).
"""

from __future__ import annotations

import errno
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

# The exit code of a command stopped by a full or failing disk: sysexits' EX_IOERR. Not 2
# (bad usage: the same command cannot succeed) nor 1 (a bug): this one succeeds once the disk
# has room or is mended, resuming where it stopped.
EXIT_CODE = 74

# Beyond the shards: run.json rewritten beside its old copy, the locks, a file system's rounding.
RESERVE_BYTES = 64 << 10
# A line of prompts.jsonl, which a new run writes before its first pair (about 290 for VOC prompts).
PROMPT_LINE_BYTES = 300

_JPEG_HEADER = 700
_JPEG_BYTES_PER_PIXEL = 0.75
_PNG_BYTES_PER_PIXEL = 0.2
_PNG_HEADER = 100
_NPY_HEADER = 128
_JSON_BYTES = 1000
_MANIFEST_BYTES_PER_KEY = 23  # "key", in the keys list
_MANIFEST_LINE_BYTES = 180  # the rest of a manifest line: shard name, bytes, sha256
_TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads every archive to a multiple of this


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of `path` (or of its
    nearest existing parent), or None where the file system does not say."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _member_bytes(size: float) -> float:
    """A tar member: its 512-byte header and its data padded to 512 bytes (half a block on average)."""
    return tarfile.BLOCKSIZE + size + tarfile.BLOCKSIZE / 2


def estimated_pair_bytes(config, samples_per_shard: int) -> int:
    """Bytes one pair adds to a run of `config` (a RunConfig), from its settings alone."""
    d, m = config.diffusion, config.masks
    pixels = d.height * d.width
    members = [_JPEG_HEADER + _JPEG_BYTES_PER_PIXEL * pixels] * 2 + [_JSON_BYTES]
    if m.source != "none":
        members.append(_PNG_HEADER + _PNG_BYTES_PER_PIXEL * pixels)
        if "attention" in m.source:
            # float16 maps of each class at the latent resolution (1/8 of the image), positive and negative
            classes = config.prompts.max_classes_per_sample
            members.append(_NPY_HEADER + 2 * classes * (pixels / 64) * 2)
    per_shard = 2 * tarfile.BLOCKSIZE + _TAR_RECORD + _MANIFEST_LINE_BYTES  # end blocks, padding (at most)
    pair = sum(_member_bytes(b) for b in members) + _MANIFEST_BYTES_PER_KEY
    return int(pair + per_shard / max(1, samples_per_shard))


def measured_pair_bytes(run_dir: Path) -> int | None:
    """Bytes per pair of the run's finished shards (manifest lines included), or None if it has none."""
    from magicseg_engine.data.shards import MANIFEST, RunState

    try:
        state = RunState.load(run_dir, verify=False, repair=False)
    except Exception:  # an estimate: a damaged run is reported by the command itself
        return None
    pairs = sum(len(s.keys) for s in state.shards)
    if not pairs:
        return None
    manifest = run_dir / MANIFEST
    listed = manifest.stat().st_size if manifest.is_file() else 0
    return int((sum(s.bytes for s in state.shards) + listed) / pairs) + 1


def run_need(run_dir: Path, config, pairs_left: int, samples_per_shard: int) -> tuple[int, int, str]:
    """(bytes, bytes per pair, where the per-pair figure came from) for `pairs_left` more pairs."""
    measured = measured_pair_bytes(run_dir)
    if measured is not None:
        per_pair, source = measured, "the run's finished shards"
    else:
        per_pair, source = estimated_pair_bytes(config, samples_per_shard), "the preset's image size"
    return pairs_left * per_pair + RESERVE_BYTES, per_pair, source


def check_space(out: Path, needed: int, pairs_left: int, per_pair: int, source: str, flag: str) -> None:
    """UsageError if the file system of `out` has less than `needed` bytes free."""
    from magicseg_engine.errors import UsageError

    free = free_bytes(out)
    if free is None or free >= needed:
        return
    raise UsageError(
        f"{out} is on a file system with {human(free)} free, and this run needs about {human(needed)} more "
        f"({pairs_left} pairs at about {human(per_pair)} each, from {source}); free space or choose another "
        f"--out ({flag} skips this check)")


# --- the line a command prints when the disk fails under it -------------------------------------
#
# A command registers what it still needs (`note_need`) and how it continues (`note_retry`);
# the command line's error handler asks for both when a write fails. Both are per process, and
# the handler clears them before each command.

_need: Callable[[], int | None] | None = None
_retry: Callable[[], str] | None = None


def note_need(estimate: Callable[[], int | None] | None) -> None:
    """`estimate()` gives the bytes the running command still needs (None: unknown)."""
    global _need
    _need = estimate


def note_retry(hint: Callable[[], str] | None) -> None:
    """`hint()` says how to continue after the disk is mended, e.g. "run the same command with --resume"."""
    global _retry
    _retry = hint


def clear_notes() -> None:
    global _need, _retry
    _need = _retry = None


def is_disk_error(err: BaseException) -> bool:
    from magicseg_engine.atomic import DISK_ERRNOS

    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def describe_write_error(err: OSError, default_retry: str) -> str:
    """One line: the file, what the error means, the free space and the need, and what to do."""
    path = err.filename or "a file"
    name = errno.errorcode.get(err.errno, str(err.errno))
    meaning = os.strerror(err.errno)
    retry = _safe(_retry) or default_retry
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(Path(path).parent) if err.filename else None
        need = _safe(_need)
        room = f"{human(free)} free on its file system" if free is not None else "its file system does not say how much is free"
        room += f", and it needs about {human(need)} more" if need else ""
        what = "free space (or raise the quota)" if err.errno == errno.EDQUOT else "free space"
        return f"{meaning.lower()} ({name}) writing {path}: {room}; {what}, then {retry}; what is finished is kept"
    if err.errno == errno.EROFS:
        return (f"{meaning.lower()} ({name}) writing {path}: the file system was mounted read-only, often after "
                f"disk errors; check it (dmesg, fsck), remount it writable, then {retry}; what is finished is kept")
    # EIO also comes from reads (a shard on a failing disk), so the line does not say "writing".
    return (f"{meaning.lower()} ({name}) on {path}: the disk or file system failed; check it (dmesg, "
            f"fsck), then {retry}; what is finished is kept")


def _safe(fn):
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # the line must print whatever the folder holds
        return None
