"""The torch loader over a run directory's finished shards: aligned pairs and label maps, exact resume.

Output, one dict per batch (B samples, S = `size`):

    image    float32 [B, 3, S, S]  the positive, normalised with CLIP_MEAN / CLIP_STD, padding 0
    twin     float32 [B, 3, S, S]  its counterfactual twin (neg.jpg), the same crop, flip and normalisation
    mask     int64   [B, S, S]     0 background, i = the i-th name of `classes`, IGNORE_INDEX (255) ignore and padding
    classes  list[list[str]]       each sample's class names, from its json
    key      list[str]             each sample's key

Which samples: only shards listed in manifest.jsonl are read (a shard being written is not).
The loader indexes them when it is built, reading tar headers and the small json members
(about 0.1 ms a sample with a warm page cache, so a minute or two per million samples), and
leaves out what cannot make a training sample, with a logged warning (the first few of each
kind) and a count in `loader.skipped`, reason -> samples:

    bad_shard        a listed shard that is missing, of another size than its manifest line
                     (cut short), unreadable as tar, or (verify=True) of another sha256
    missing_member   no pos.jpg, neg.jpg or json
    no_mask          no mask.png (a run generated with `--mask-source none`)
    bad_json         json unreadable or without a list of 1-254 class names
    flagged          failed the counterfactual check (kept with skip_flagged=False)
    unknown_class    a class outside `vocabulary`, when one is given
    duplicate_key    a key an earlier shard holds
    bad_manifest_line  a manifest line that does not parse (counts lines)

A sample that fails later, when it is decoded, is dropped from its batch, which is then
smaller, and counted the same way: decode_error (pos / neg / mask bytes PIL cannot decode),
bad_mask (not an 8-bit label map, or labels beyond its classes), size_mismatch (pos, neg and
mask differ in size), read_error. Nothing in the data stops an epoch.

Order, ranks and augmentation: epoch e orders the indexed samples by a permutation drawn from
(seed, e); rank r of W takes every W-th sample from position r. With `even=True` (default) the
order is first cut to a multiple of W, so every rank has the same number of samples and
batches (DDP needs that); the few samples cut differ from epoch to epoch. A sample's crop and
flip are drawn from (seed, epoch, sample key) alone, so they do not depend on the rank, the
batch size, the number of workers or on where a run was resumed.

Exact resume: `state_dict()` is {"epoch", "consumed", ...}: `consumed` counts the positions of
this rank's epoch order that batches already handed to the caller covered (dropped samples
included). Batch j of an epoch covers positions [consumed_at_start + j*B, ... + B), so a loader
given that state by `load_state_dict()` starts with the very next batch, and yields the same
batches an uninterrupted loader would. This holds for any `num_workers`: DataLoader returns
batches in order, the state counts only batches already yielded (not those prefetched), and
decoding is a function of the sample and (seed, epoch) alone. With `even=True` the state is
the same on every rank at every step, so saving rank 0's is enough. The batch size may change
across a resume (positions are samples, not batches); the seed, world size, shuffle, even and
the sample list may not (load_state_dict refuses such a state). Each call of `iter(loader)` runs
the rest of the current epoch; when the epoch's last batch is yielded the state moves to
(epoch + 1, 0), so a state saved right after it starts the next epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicseg_engine.data.shards import MANIFEST, SHARDS_DIR, ShardInfo

log = logging.getLogger(__name__)

# OpenAI CLIP's image normalisation: the encoders the models start from were trained with it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = 255

# Members a training sample needs, in the column order of SampleIndex.offsets / sizes.
MEMBERS = ("pos.jpg", "neg.jpg", "mask.png", "json")
_WARN_LIMIT = 10  # warnings per skip reason; the counts in `skipped` keep growing after that
_MAX_OPEN_FILES = 64


# ---------------------------------------------------------------------------------------------
# Index: which samples exist and where their members lie


@dataclass
class SampleIndex:
    """The usable samples of a run, in manifest order, with their members' byte ranges.

    Arrays rather than objects so that a million samples stay small and DataLoader workers
    share them copy-on-write.
    """

    run_dir: Path
    shards: list[Path]          # shard files, manifest order
    shard: np.ndarray           # int32 [N]: index into `shards`
    keys: np.ndarray            # bytes [N]
    offsets: np.ndarray         # int64 [N, len(MEMBERS)]: data offset of each member
    sizes: np.ndarray           # int64 [N, len(MEMBERS)]
    skipped: Counter            # reason -> samples left out while indexing
    classes: tuple[str, ...] = ()  # every class name the usable samples have, sorted

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode("ascii")

    def fingerprint(self) -> str:
        """Identifies the sample list: a saved loader state applies only to the same list."""
        digest = hashlib.sha256()
        for key in self.keys:
            digest.update(key + b"\n")
        return digest.hexdigest()[:16]


class _Warner:
    """Logs the first few skips of each reason; counts them all."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self._logged: Counter = Counter()

    def skip(self, reason: str, what: str, samples: int = 1) -> None:
        self.counts[reason] += samples
        self._logged[reason] += 1
        if self._logged[reason] <= _WARN_LIMIT:
            last = self._logged[reason] == _WARN_LIMIT
            log.warning("skipping %s: %s%s", what, reason, " (further ones are counted, not logged)" if last else "")


def _read_manifest(run_dir: Path, warn: _Warner) -> list[ShardInfo]:
    path = run_dir / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {run_dir} holds no finished shards") from None
    entries = []
    # The piece after the last newline is a line still being written (or torn by a kill).
    for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            entries.append(ShardInfo.parse(line))
        except ValueError as err:
            warn.skip("bad_manifest_line", f"{path} line {lineno} ({err})")  # counts lines: its samples are unknown
    return entries


class _Unusual(Exception):
    """A tar feature the plain header reader leaves to tarfile."""


_BLOCK = 512


def _plain_members(f) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, read from the 512-byte headers alone.

    Shards are plain USTAR archives (ShardWriter writes them so); reading their headers
    directly is several times faster than tarfile, which matters when a loader indexes
    millions of samples at start. Raises _Unusual for anything else (extension headers, large
    sizes, an unusual checksum), to be read with tarfile, and tarfile.ReadError for an archive
    that ends early.
    """
    offset = 0
    while True:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("the archive ends inside a member or without its end marker")
        if header == bytes(_BLOCK):
            return
        try:
            checksum = int(header[148:156].strip(b"\0 "), 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _Unusual from None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or header[156:157] not in (b"0", b"\0", b"5"):
            raise _Unusual
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if header[156:157] != b"5":
            yield (prefix + b"/" + name if prefix else name).decode("utf-8"), offset + _BLOCK, size
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tarfile_members(f) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, member.offset_data, member.size


_Members = dict[str, dict[str, tuple[int, int]]]  # key -> extension -> (data offset, size)


def _scan_members(path: Path, wanted: Iterable[str]) -> tuple[list[str], _Members, dict[str, bytes]]:
    """Keys in file order, each key's wanted members as (offset, size), and each key's json bytes."""
    wanted = set(wanted)
    with open(path, "rb") as f:
        try:
            listing = list(_plain_members(f))
        except _Unusual:
            f.seek(0)  # tarfile reads from the current position
            listing = list(_tarfile_members(f))
        order: list[str] = []
        members: _Members = {}
        jsons: dict[str, bytes] = {}
        for name, offset, size in listing:
            key, _, ext = name.partition(".")
            if key not in members:
                order.append(key)
                members[key] = {}
            if ext in wanted:
                members[key][ext] = (offset, size)
            if ext == "json":
                f.seek(offset)
                jsons[key] = f.read(size)
                if len(jsons[key]) != size:
                    raise tarfile.ReadError(f"{name} is cut short")
    return order, members, jsons


def _sample_problem(meta_bytes: bytes | None, present: dict, vocabulary: frozenset[str] | None,
                    skip_flagged: bool) -> str | None:
    """Why a sample cannot be used, as a skip reason; None when it can."""
    if any(m not in present for m in ("pos.jpg", "neg.jpg", "json")):
        return "missing_member"
    if "mask.png" not in present:
        return "no_mask"
    try:
        meta = json.loads(meta_bytes)
        classes = meta["classes"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return "bad_json"
    if (not isinstance(classes, list) or not 1 <= len(classes) < IGNORE_INDEX
            or not all(isinstance(c, str) for c in classes)):
        return "bad_json"
    if skip_flagged:
        masks = meta.get("masks")
        check = masks.get("counterfactual") if isinstance(masks, dict) else None
        if isinstance(check, dict) and check.get("passed") is False:
            return "flagged"
    if vocabulary is not None and not vocabulary.issuperset(classes):
        return "unknown_class"
    return None


def build_index(run_dir: Path | str, *, vocabulary: Iterable[str] | None = None, skip_flagged: bool = True,
                verify: bool = False) -> SampleIndex:
    """Index the usable samples of a run's finished shards; see the module docstring for what is dropped.

    `verify` also checks each shard against its manifest sha256 (reads every byte; off by
    default because a size check already catches a shard cut short).
    """
    run_dir = Path(run_dir)
    vocab = frozenset(vocabulary) if vocabulary is not None else None
    counts: Counter = Counter()
    warn = _Warner(counts)
    shards: list[Path] = []
    shard_ids, keys, offsets, sizes = [], [], [], []
    seen: set[str] = set()
    names: set[str] = set()
    for entry in _read_manifest(run_dir, warn):
        path = run_dir / SHARDS_DIR / entry.name
        problem = _shard_problem(path, entry, verify)
        order, members, jsons = [], {}, {}
        if problem is None:
            try:
                order, members, jsons = _scan_members(path, MEMBERS)
            except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as err:
                problem = f"not a readable tar file ({err})"
            else:
                if tuple(order) != entry.keys:
                    problem = "its samples differ from its manifest line"
        if problem is not None:
            warn.skip("bad_shard", f"the {len(entry.keys)} samples of {path}: {problem}", samples=len(entry.keys))
            continue
        shard_index = len(shards)
        shards.append(path)
        for key in order:
            if key in seen:
                warn.skip("duplicate_key", f"sample {key} of {path}: listed in an earlier shard")
                continue
            seen.add(key)
            reason = _sample_problem(jsons.get(key), members[key], vocab, skip_flagged)
            if reason is not None:
                warn.skip(reason, f"sample {key} of {path}")
                continue
            names.update(json.loads(jsons[key])["classes"])
            shard_ids.append(shard_index)
            keys.append(key.encode("ascii"))
            offsets.append([members[key][m][0] for m in MEMBERS])
            sizes.append([members[key][m][1] for m in MEMBERS])
    if counts:
        log.warning("%s: %d usable samples; left out: %s", run_dir, len(keys), dict(counts))
    return SampleIndex(
        run_dir, shards,
        np.asarray(shard_ids, dtype=np.int32),
        np.asarray(keys, dtype=np.bytes_),
        np.asarray(offsets, dtype=np.int64).reshape(-1, len(MEMBERS)),
        np.asarray(sizes, dtype=np.int64).reshape(-1, len(MEMBERS)),
        counts,
        tuple(sorted(names)),
    )


def _shard_problem(path: Path, entry: ShardInfo, verify: bool) -> str | None:
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot stat it ({err.strerror})"
    if size != entry.bytes:
        return f"{size} bytes, not the {entry.bytes} its manifest line records"
    if verify and _sha256(path) != entry.sha256:
        return "its sha256 differs from its manifest line"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Augmentation: one random resized crop and flip, shared by image, twin and mask


@dataclass(frozen=True)
class Augment:
    """The random resized crop and flip, like the reference segmentation recipe.

    The image is rescaled so that its short side is `base_size * s` (s uniform in `scale`,
    `base_size` defaults to `size`), stretched by an aspect ratio drawn log-uniformly from
    `ratio` (width / height), then a `size` x `size` window is cropped at a uniform position;
    a side shorter than `size` is padded at the bottom / right. The window is flipped
    horizontally with probability `flip_prob`. With `enabled=False` the image is rescaled to
    short side `size` and centre-cropped, with no flip: evaluation.
    """

    size: int = 512
    scale: tuple[float, float] = (0.5, 2.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.5
    base_size: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad augmentation settings {self}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


@dataclass(frozen=True)
class CropParams:
    """One sample's geometry: the rescaled size, the window's top-left corner in it, the flip."""

    height: int
    width: int
    top: int
    left: int
    flip: bool


def draw_crop(aug: Augment, height: int, width: int, rng: np.random.Generator) -> CropParams:
    """The crop of an image of `height` x `width`; always draws the same numbers from `rng`."""
    u_scale, u_ratio, u_top, u_left, u_flip = rng.random(5)
    if not aug.enabled:
        k = aug.size / min(height, width)
        h, w = max(1, round(height * k)), max(1, round(width * k))
        return CropParams(h, w, max(0, (h - aug.size) // 2), max(0, (w - aug.size) // 2), False)
    s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u_scale
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    stretch = math.sqrt(math.exp(log_lo + (log_hi - log_lo) * u_ratio))
    k = (aug.base_size or aug.size) * s / min(height, width)
    h, w = max(1, round(height * k / stretch)), max(1, round(width * k * stretch))
    top = int(u_top * (h - aug.size + 1)) if h > aug.size else 0
    left = int(u_left * (w - aug.size + 1)) if w > aug.size else 0
    return CropParams(h, w, top, left, bool(u_flip < aug.flip_prob))


def apply_crop(image: Image.Image, p: CropParams, size: int, resample: int) -> Image.Image:
    """The crop window of `image` rescaled to `p`, unpadded (at most size x size), flipped if asked.

    Resizing only the source box the window covers gives the same pixels as rescaling the whole
    image and cropping, without paying for the whole rescaled image.
    """
    W, H = image.size
    ch, cw = min(size, p.height - p.top), min(size, p.width - p.left)
    sx, sy = W / p.width, H / p.height
    box = (p.left * sx, p.top * sy, (p.left + cw) * sx, (p.top + ch) * sy)
    out = image.resize((cw, ch), resample, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p.flip else out


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    key_id = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed & (2**64 - 1), epoch, key_id])


# ---------------------------------------------------------------------------------------------
# Decoding one sample


class _SampleError(Exception):
    """A sample that cannot be used; args are (reason, detail)."""


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _normalised(image: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] float32: CLIP-normalised pixels, zeros where the window ran out of image."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    out = torch.zeros(3, size, size)
    out[:, : pixels.shape[1], : pixels.shape[2]] = (pixels.float() / 255.0 - _MEAN) / _STD
    return out


def _decode_rgb(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes; all mean the same here
        raise _SampleError("decode_error", f"{what}: {err}") from None


def _decode_mask(data: bytes, classes: int) -> Image.Image:
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except Exception as err:
        raise _SampleError("decode_error", f"mask.png: {err}") from None
    if mask.mode not in ("L", "P"):
        raise _SampleError("bad_mask", f"mask.png has mode {mask.mode}, not an 8-bit label map")
    labels = np.asarray(mask)
    bad = (labels > classes) & (labels != IGNORE_INDEX)
    if bad.any():
        raise _SampleError("bad_mask", f"label {int(labels[bad].max())} but only {classes} classes")
    return Image.fromarray(labels, mode="L")  # "P" would resample palette entries; keep raw labels


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of an index: item (i, epoch) is sample i with epoch's augmentation.

    Returns a sample dict, or ("skip", reason, detail) for a sample that fails to decode.
    Members are read with pread, which keeps no file position, so forked workers may share the
    descriptors they inherit.
    """

    def __init__(self, index: SampleIndex, aug: Augment, seed: int) -> None:
        self.index = index
        self.aug = aug
        self.seed = seed
        self._files: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self) -> dict:
        # Workers started by "spawn" get a pickled copy: descriptor numbers mean nothing there.
        return {**self.__dict__, "_files": OrderedDict()}

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, i: int, column: int) -> bytes:
        shard = int(self.index.shard[i])
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self.index.shards[shard], os.O_RDONLY)
            self._files[shard] = fd
            if len(self._files) > _MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        self._files.move_to_end(shard)
        size = int(self.index.sizes[i, column])
        data = os.pread(fd, size, int(self.index.offsets[i, column]))
        if len(data) != size:
            raise _SampleError("read_error", f"{MEMBERS[column]} is cut short")
        return data

    def __getitem__(self, item: tuple[int, int]):
        i, epoch = item
        key = self.index.key(i)
        try:
            return self._load(i, epoch, key)
        except _SampleError as err:
            return ("skip", err.args[0], f"sample {key}: {err.args[1]}")
        except OSError as err:
            return ("skip", "read_error", f"sample {key}: {err}")

    def _load(self, i: int, epoch: int, key: str) -> dict:
        try:  # checked when indexed; checked again in case the shard changed since
            classes = json.loads(self._read(i, 3))["classes"]
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise TypeError("'classes' is not a list of names")
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
            raise _SampleError("bad_json", str(err)) from None
        image = _decode_rgb(self._read(i, 0), "pos.jpg")
        twin = _decode_rgb(self._read(i, 1), "neg.jpg")
        mask = _decode_mask(self._read(i, 2), len(classes))
        if not image.size == twin.size == mask.size:
            raise _SampleError("size_mismatch", f"pos {image.size}, neg {twin.size}, mask {mask.size}")
        p = draw_crop(self.aug, image.height, image.width, sample_rng(self.seed, epoch, key))
        size = self.aug.size
        labels = torch.full((size, size), IGNORE_INDEX, dtype=torch.int64)
        cropped = np.asarray(apply_crop(mask, p, size, Image.NEAREST))
        labels[: cropped.shape[0], : cropped.shape[1]] = torch.from_numpy(cropped.astype(np.int64))
        return {
            "image": _normalised(apply_crop(image, p, size, Image.BILINEAR), size),
            "twin": _normalised(apply_crop(twin, p, size, Image.BILINEAR), size),
            "mask": labels,
            "classes": list(classes),
            "key": key,
        }

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)


def collate(items: list) -> dict:
    """Stack the decoded samples; keep the skips for the loader to count ("_skipped")."""
    good = [x for x in items if isinstance(x, dict)]
    batch: dict = {"_skipped": [x[1:] for x in items if not isinstance(x, dict)]}
    if good:
        for name in ("image", "twin", "mask"):
            batch[name] = torch.stack([x[name] for x in good])
        batch["classes"] = [x["classes"] for x in good]
        batch["key"] = [x["key"] for x in good]
    return batch


# ---------------------------------------------------------------------------------------------
# The loader


class _Batches(torch.utils.data.Sampler):
    """Batches of (sample, epoch) from the loader's current position to the end of its epoch.

    Reads the position when iteration starts, so one DataLoader (persistent workers too)
    serves every epoch and every resume.
    """

    def __init__(self, loader: PairLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        loader = self.loader
        # Fixed when iteration starts: with workers, DataLoader draws batches ahead of the
        # loop, while the loop already moves the loader's position on.
        epoch, start, step = loader.epoch, loader.consumed, loader.batch_size
        stop = loader._epoch_stop(start)
        order = loader.epoch_order(epoch)
        for first in range(start, stop, step):
            yield [(int(i), epoch) for i in order[first:min(first + step, stop)]]

    def __len__(self) -> int:
        start = self.loader.consumed
        return math.ceil(max(0, self.loader._epoch_stop(start) - start) / self.loader.batch_size)


class PairLoader:
    """Batches of (image, twin, mask, classes, key) from a run directory; see the module docstring.

    `vocabulary`: when given, samples with a class outside it are skipped. `rank`/`world_size`:
    this process's share. `shuffle=False` keeps manifest order (still split across ranks).
    `drop_last`: leave out the epoch's last, incomplete batch. The augmentation settings are
    those of `Augment`; `augment=False` gives evaluation crops.
    """

    def __init__(
        self,
        run_dir: Path | str,
        batch_size: int,
        size: int = 512,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        even: bool = True,
        drop_last: bool = False,
        augment: bool = True,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (1.0, 1.0),
        flip_prob: float = 0.5,
        base_size: int | None = None,
        vocabulary: Sequence[str] | None = None,
        skip_flagged: bool = True,
        verify: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        index: SampleIndex | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.index = index if index is not None else build_index(
            run_dir, vocabulary=vocabulary, skip_flagged=skip_flagged, verify=verify)
        if len(self.index) < world_size:
            raise ValueError(f"{run_dir} has {len(self.index)} usable samples, fewer than the {world_size} ranks "
                             f"(left out: {dict(self.index.skipped) or 'none'})")
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.even, self.drop_last = shuffle, even, drop_last
        self.aug = Augment(size, tuple(scale), tuple(ratio), flip_prob, base_size, augment)
        self.epoch = 0
        self.consumed = 0
        self.skipped: Counter = Counter(self.index.skipped)  # reason -> samples; indexing and decoding
        self._warn = _Warner(self.skipped)
        self._fingerprint = self.index.fingerprint()
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.dataset = PairDataset(self.index, self.aug, seed)
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Batches(self), collate_fn=collate, num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=persistent_workers and num_workers > 0,
        )

    # --- order ---------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in the order they are read."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.index)
            rng = np.random.default_rng([self.seed & (2**64 - 1), epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.even:
                order = order[: n - n % self.world_size]
            self._order_cache = (epoch, order[self.rank::self.world_size])
        return self._order_cache[1]

    @property
    def samples_per_epoch(self) -> int:
        """Positions in this rank's epoch order (bad samples included)."""
        n = len(self.index)
        if self.even:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def _epoch_stop(self, start: int) -> int:
        """Where batches from `start` end: the epoch's end, or with drop_last the end of the last
        full batch (`start` need not be a multiple of the batch size after a resume)."""
        n = self.samples_per_epoch
        return start + (n - start) // self.batch_size * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        """Batches in a whole epoch for this rank (fewer if batches end up empty)."""
        return math.ceil(self._epoch_stop(0) / self.batch_size)

    # --- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; the state moves on as each batch is handed out."""
        if self.consumed >= self._epoch_stop(self.consumed):  # a state saved at an epoch's very end
            self.epoch, self.consumed = self.epoch + 1, 0
        epoch, start = self.epoch, self.consumed
        stop = self._epoch_stop(start)
        position = start
        for batch in self._loader:
            position = min(position + self.batch_size, stop)
            for reason, detail in batch.pop("_skipped"):
                self._warn.skip(reason, detail)
            if position >= stop:
                self.epoch, self.consumed = epoch + 1, 0
            else:
                self.consumed = position
            if "image" in batch:
                yield batch
        if self.epoch == epoch:  # the epoch ended on batches with no usable sample
            self.epoch, self.consumed = epoch + 1, 0

    # --- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the next batch starts: {"epoch", "consumed"} plus what they are relative to."""
        return {
            "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
            "world_size": self.world_size, "shuffle": self.shuffle, "even": self.even,
            "samples": len(self.index), "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; ValueError if it was saved over other samples or another order."""
        for name, ours in (("seed", self.seed), ("world_size", self.world_size), ("shuffle", self.shuffle),
                           ("even", self.even), ("samples", len(self.index)), ("fingerprint", self._fingerprint)):
            if state.get(name) != ours:
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r}, this loader {ours!r}: it was saved over "
                    "other samples or another order, so resuming from it would repeat or skip samples")
        if not 0 <= state["consumed"] <= self.samples_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state position {state['epoch']}:{state['consumed']} is out of range")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
