"""Read a run directory once: statistics of every finished sample and the pairs to show.

What scales: a run may hold millions of pairs in thousands of shards, so this reads each
finished shard once, front to back, taking only the tar headers and the small `{key}.json`
of every sample; image members are skipped with a seek (their offsets are remembered). The
statistics are running counters and fixed-bin histograms, so memory does not grow with the
number of samples. The pairs to show are kept as offsets by `sampling.ClassBalancedPicker`,
at most `samples` per class, and only their images are read afterwards (`thumbnails.py`).

Only shards listed in manifest.jsonl are read; shards being written (temporary files, or
renamed but not yet listed) are counted and left alone, so a run in progress can be
reported on while it writes. Nothing in the run directory is changed or locked. A listed
shard that is missing, of the wrong size or not readable as a tar file is skipped whole (a
shard read half way would give statistics of an unknown part of it), and the report says so.
The shards' sha256 is not checked: that would read every image of the run.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magicseg_engine.data.shards import MANIFEST, SHARDS_DIR, ShardInfo
from magicseg_engine.errors import UsageError
from magicseg_engine.report.sampling import ClassBalancedPicker

RUN_FILE = "run.json"  # the pipeline's name; not imported from it because it pulls in torch
DROPPED_FILE = "dropped.jsonl"
IMAGE_MEMBERS = ("pos.jpg", "neg.jpg", "mask.png")
AREA_BINS = np.linspace(0.0, 1.0, 21)  # mask area as a fraction of the image, 5 % wide bins
QUALITY_BINS = np.linspace(0.0, 1.0, 21)


@dataclass(frozen=True)
class SampleRef:
    """A sample chosen for the grid: where its images are, and what its JSON says about it."""

    key: str
    shard: Path
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size) inside the shard
    classes: tuple[str, ...]
    prompt: str
    negative_prompt: str
    counterfactual_passed: bool | None  # None: the sample holds no counterfactual check
    counterfactual_quality: float | None


@dataclass(frozen=True)
class SkippedShard:
    name: str
    samples: int  # as many as its manifest line lists
    reason: str


@dataclass
class ClassStats:
    samples: int = 0
    masks: int = 0  # samples with a non-empty mask of this class
    no_mask: int = 0  # samples where the class was not found or its mask is empty
    flagged: int = 0  # samples with this class that failed the counterfactual check
    usable: int = 0  # samples with a non-empty mask of this class that did not fail the check
    area_sum: float = 0.0
    area_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(AREA_BINS) - 1, np.int64))

    @property
    def mean_area(self) -> float | None:
        return self.area_sum / self.masks if self.masks else None


@dataclass
class RunDigest:
    """Everything the page shows about one run."""

    run_dir: Path
    run_meta: dict | None = None  # run.json, when present and readable
    run_meta_problem: str | None = None
    shards_listed: int = 0
    shards_read: int = 0
    skipped_shards: list[SkippedShard] = field(default_factory=list)
    skipped_manifest_lines: list[str] = field(default_factory=list)
    shards_in_progress: int = 0  # temporary files and renamed shards the manifest does not list yet
    samples: int = 0
    classes: dict[str, ClassStats] = field(default_factory=dict)
    classes_per_image: Counter = field(default_factory=Counter)
    mask_sources: Counter = field(default_factory=Counter)
    checked: int = 0  # samples with a counterfactual check
    flagged: int = 0  # of those, how many failed it (kept in the shards, marked)
    quality_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(QUALITY_BINS) - 1, np.int64))
    quality_threshold: float | None = None  # quality below 1 - max coverage fails the check
    dropped: int = 0  # pairs that failed the check and were left out of the shards
    chosen: list[SampleRef] = field(default_factory=list)

    @property
    def skipped_samples(self) -> int:
        return sum(s.samples for s in self.skipped_shards)

    def class_names(self) -> list[str]:
        """Classes by number of samples, most frequent first."""
        return sorted(self.classes, key=lambda n: (-self.classes[n].samples, n))


def gather_run(run_dir: Path | str, samples: int, *, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> RunDigest:
    """Statistics of every finished sample of `run_dir` and up to `samples` pairs to show.

    `progress(done, total)` is called after each shard. Raises UsageError when the directory
    holds no run or nothing in it can be read; a shard that cannot be read is skipped and
    recorded in the digest instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--data {run_dir} is not a directory; pass a run directory written by generate")
    entries, bad_lines = _read_manifest(run_dir)
    digest = RunDigest(run_dir, shards_listed=len(entries), skipped_manifest_lines=bad_lines)
    digest.shards_in_progress = _count_in_progress(run_dir, {e.name for e in entries})
    if not entries and not bad_lines:
        waiting = (f" ({digest.shards_in_progress} being written)" if digest.shards_in_progress else "")
        raise UsageError(f"{run_dir} holds no finished shards{waiting}; pass a run directory written by "
                         "generate, or wait until its first shard is finished")
    digest.run_meta, digest.run_meta_problem = _read_run_meta(run_dir)
    digest.dropped = _count_lines(run_dir / DROPPED_FILE)
    picker = ClassBalancedPicker(samples, seed)
    for done, entry in enumerate(entries, 1):
        try:
            shard_samples = _read_shard(run_dir / SHARDS_DIR / entry.name, entry)
        except ValueError as err:
            digest.skipped_shards.append(SkippedShard(entry.name, len(entry.keys), str(err)))
        else:
            digest.shards_read += 1
            for meta, ref in shard_samples:
                _count(digest, meta)
                picker.offer(ref, ref.classes)
        if progress is not None:
            progress(done, len(entries))
    if digest.samples == 0:
        first = (digest.skipped_shards[0].reason if digest.skipped_shards
                 else digest.skipped_manifest_lines[0] if digest.skipped_manifest_lines else "no samples")
        raise UsageError(f"nothing in {run_dir} could be read: {first}; restore the shards from a copy "
                         "or generate the run again")
    digest.chosen = picker.chosen()
    return digest


def _read_manifest(run_dir: Path) -> tuple[list[ShardInfo], list[str]]:
    """Listed shards, and one problem per manifest line that is not a shard entry."""
    path = run_dir / MANIFEST
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no {MANIFEST} and so no finished shards; pass a run directory "
                         "written by generate")
    data = path.read_bytes()
    entries, problems, seen = [], [], set()
    # The piece after the last newline is a line still being written (or torn by a kill).
    for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            entry = ShardInfo.parse(line)
        except ValueError as err:
            problems.append(f"{MANIFEST} line {lineno} is not a shard entry ({err})")
            continue
        if entry.name in seen:
            problems.append(f"{MANIFEST} line {lineno} lists {entry.name} a second time")
            continue
        seen.add(entry.name)
        entries.append(entry)
    return entries, problems


def _count_in_progress(run_dir: Path, listed: set[str]) -> int:
    shards_dir = run_dir / SHARDS_DIR
    if not shards_dir.is_dir():
        return 0
    return sum(1 for p in shards_dir.iterdir()
               if p.name.endswith(".tmp") or (p.name.endswith(".tar") and p.name not in listed))


def _read_run_meta(run_dir: Path) -> tuple[dict | None, str | None]:
    path = run_dir / RUN_FILE
    if not path.exists():
        return None, f"{RUN_FILE} is absent: the run was not written by generate"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{RUN_FILE} is not readable JSON ({err})"
    if not isinstance(meta, dict):
        return None, f"{RUN_FILE} does not hold a JSON object"
    return meta, None


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def _read_shard(path: Path, entry: ShardInfo) -> list[tuple[dict, SampleRef]]:
    """(JSON, reference) of every sample of one listed shard; ValueError if it is unreadable."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError("the file is missing") from None
    if size != entry.bytes:
        raise ValueError(f"it has {size} bytes, not the {entry.bytes} its manifest line records")
    members: dict[str, dict[str, tuple[int, int]]] = {}
    metas: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            # Iterating a seekable tar reads headers and seeks past the data it is not asked for.
            for member in tar:
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = (member.offset_data, member.size)
                if ext == "json":
                    metas[key] = _parse_meta(tar.extractfile(member).read(), member.name)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"not a readable tar file ({err})") from None
    # A damaged header after the first one ends tarfile's iteration without an error, so
    # the members that should follow it are checked for instead.
    missing = [k for k in entry.keys if k not in metas]
    if missing:
        raise ValueError(f"sample {missing[0]} has no readable JSON ({len(missing)} samples are incomplete)")
    files = {k: frozenset(members[k]) for k in entry.keys}
    expected = frozenset().union(*files.values())
    short = [k for k in entry.keys if files[k] != expected]
    if short:
        lacking = ", ".join(sorted(expected - files[short[0]]))
        raise ValueError(f"sample {short[0]} lacks {lacking} ({len(short)} samples are incomplete)")
    return [(metas[k], _ref(path, k, members[k], metas[k])) for k in entry.keys]


def _parse_meta(data: bytes, name: str) -> dict:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name} is not JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{name} has no 'classes' list")
    return meta


def _check(meta: dict) -> dict:
    masks = meta.get("masks")
    check = masks.get("counterfactual") if isinstance(masks, dict) else None
    return check if isinstance(check, dict) else {}


def _ref(shard: Path, key: str, members: dict[str, tuple[int, int]], meta: dict) -> SampleRef:
    check = _check(meta)
    quality = check.get("quality")
    return SampleRef(
        key=key, shard=shard,
        members={ext: members[ext] for ext in IMAGE_MEMBERS if ext in members},
        classes=tuple(str(c) for c in meta["classes"]),
        prompt=str(meta.get("prompt", "")), negative_prompt=str(meta.get("negative_prompt", "")),
        counterfactual_passed=check["passed"] if isinstance(check.get("passed"), bool) else None,
        counterfactual_quality=_fraction(quality),
    )


def _count(digest: RunDigest, meta: dict) -> None:
    """Add one sample's JSON to the running statistics."""
    names = [str(c) for c in meta["classes"]]
    digest.samples += 1
    digest.classes_per_image[len(names)] += 1
    digest.mask_sources[str(meta.get("mask_source", "unknown"))] += 1
    check = _check(meta)
    failed = check.get("passed") is False
    if isinstance(check.get("passed"), bool):
        digest.checked += 1
        digest.flagged += failed
    quality = _fraction(check.get("quality"))
    if quality is not None:
        digest.quality_hist[_bin(quality, QUALITY_BINS)] += 1
    threshold = _fraction(check.get("threshold"))
    if threshold is not None:
        digest.quality_threshold = 1.0 - threshold
    pixels = _image_pixels(meta)
    per_class = {}
    masks = meta.get("masks")
    for entry in masks.get("classes", []) if isinstance(masks, dict) else []:
        if isinstance(entry, dict) and "name" in entry:
            per_class[str(entry["name"])] = entry
    for name in names:
        stats = digest.classes.setdefault(name, ClassStats())
        stats.samples += 1
        stats.flagged += failed
        entry = per_class.get(name)
        if entry is None:
            continue  # a run without masks
        # generate records "area", synthetic runs "pixels"; both are pixel counts of the mask.
        area = _fraction(entry.get("area", entry.get("pixels", 0)), upper=math.inf)
        if not entry.get("found", True) or not area or not pixels:
            stats.no_mask += 1
            continue
        fraction = min(1.0, float(area) / pixels)
        stats.masks += 1
        stats.usable += not failed
        stats.area_sum += fraction
        stats.area_hist[_bin(fraction, AREA_BINS)] += 1


def _fraction(value, upper: float = 1.0) -> float | None:
    """A number of the sample JSON, clamped to [0, upper]; None for anything else (a string, NaN,
    infinity, a list: a JSON edited by hand or damaged must not stop the report)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return min(max(value, 0.0), upper) if math.isfinite(value) else None


def _image_pixels(meta: dict) -> int:
    size = meta.get("size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0] * size[1]
    return 0


def _bin(value: float, edges: np.ndarray) -> int:
    """Index of the equal-width bin of [0, 1] holding `value`, the last bin closed on the right.

    Computed from the bin count rather than searched among the edges: linspace's edges are
    not exact (0.7 would land below an edge of 0.7000000000000001), while scores are rounded
    decimals that belong in the bin that starts at them.
    """
    bins = len(edges) - 1
    return min(max(int(value * bins + 1e-9), 0), bins - 1)
