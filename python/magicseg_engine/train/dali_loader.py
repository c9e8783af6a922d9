"""An NVIDIA DALI loader with the output contract of `train.data.PairLoader`, for GPU decoding.

    image    float32 [B, 3, S, S]  CLIP-normalised positive, padding 0
    twin     float32 [B, 3, S, S]  its counterfactual twin, the same crop, flip and normalisation
    mask     int64   [B, S, S]     0 background, i = i-th name of `classes`, 255 ignore and padding
    classes  list[list[str]]       from each sample's json, decoded in Python after the pipeline
    key      list[str]

Tensors are on `cuda:{device_id}`, or on the CPU when `device_id` is None (then DALI decodes on
the CPU too). DALI is optional: `pip install 'magicseg-engine[dali]'`.

The samples are those `train.data.build_index` keeps, with the same skips and counts in
`skipped`: the loader writes DALI index files (wds2idx format) that list only those samples,
so `fn.readers.webdataset` never sees a bad shard or an incomplete sample. The crop and flip
follow `train.data.Augment` (rescale of the short side to base_size * U(scale), aspect
stretch, a size x size window padded at the bottom / right, horizontal flip) with one set of
random numbers per sample shared by image, twin and mask (bilinear for the images, nearest for
the mask).

Where it differs from the torch loader:
- Order: DALI visits the tar files in an order reshuffled every epoch (same seed on every
  rank) and shuffles samples in a buffer of `shuffle_buffer`; ranks take contiguous parts
  (shard_id / num_shards) of that order, disjoint and complete within an epoch. The random
  numbers are DALI's, so the same seed does not give the torch loader's crops.
- `even=True` drops the last len % world_size samples of the index once, so every rank has the
  same number of samples and batches; the same few samples are left out in every epoch.
- Decode failures: a sample whose bytes do not decode stops the pipeline with DALI's error
  (the torch loader skips it). Samples whose pos / neg / mask sizes differ, or whose mask has
  labels beyond its classes, are dropped from their batch after the pipeline and counted.
- Resume: `state_dict()` holds (epoch, batches handed out in it) and DALI's own checkpoint of
  the reader and random generators (`enable_checkpointing`), so a new loader given it continues
  with the very next batch, the same samples and crops. The checkpoint is DALI's binary
  format (bytes): valid for the same DALI version, sample list, batch size, rank and settings
  only, so every rank saves its own state; the torch loader's state is a plain position,
  the same on every rank, that also tolerates a new batch size.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from magicseg_engine.train.data import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, MEMBERS, Augment, SampleIndex, build_index

READER = "reader"
log = logging.getLogger(__name__)

INSTALL_HINT = "NVIDIA DALI is not installed: pip install 'magicseg-engine[dali]' (package nvidia-dali-cuda130)"


def import_dali():
    """The nvidia.dali modules (dali, fn, types, math), or ImportError with the install line."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return dali, fn, types, dmath


def write_index_files(index: SampleIndex, rows: np.ndarray, out_dir: Path) -> tuple[list[str], list[str]]:
    """DALI index files (wds2idx's v1.2 format) listing only the samples `rows` of `index`.

    Returns (tar paths, index paths) for the shards that keep at least one sample.
    """
    keep = np.zeros(len(index), dtype=bool)
    keep[rows] = True
    paths, index_paths = [], []
    for shard, tar in enumerate(index.shards):
        mine = np.nonzero(keep & (index.shard == shard))[0]
        if not len(mine):
            continue
        lines = [f"v1.2 {len(mine)}"]
        for i in mine:
            key = index.key(i)
            lines.append(" ".join(f"{ext} {index.offsets[i, c]} {index.sizes[i, c]} {key}.{ext}"
                                  for c, ext in enumerate(MEMBERS)))
        idx_path = out_dir / f"{shard:06d}-{tar.stem}.idx"
        idx_path.write_text("\n".join(lines) + "\n", encoding="ascii")
        paths.append(str(tar))
        index_paths.append(str(idx_path))
    return paths, index_paths


def _graph(fn, types, dmath, *, paths, index_paths, aug: Augment, rank: int, world_size: int, seed: int,
           shuffle: bool, shuffle_buffer: int, gpu: bool):
    """The pipeline body: read, decode, one shared crop and flip, normalise."""
    pos, neg, mask, meta = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=list(MEMBERS), name=READER,
        missing_component_behavior="error",  # the index files list complete samples only
        shard_id=rank, num_shards=world_size, pad_last_batch=True,
        shuffle_after_epoch=shuffle, shuffle_after_epoch_seed=seed, random_shuffle=shuffle,
        initial_fill=shuffle_buffer, seed=seed,  # the same on every rank: shards stay disjoint
    )
    source = fn.get_property(pos, key="source_info")  # "tar:offset:{key}.pos.jpg"
    shapes = [fn.peek_image_shape(x) for x in (pos, neg, mask)]
    device = "mixed" if gpu else "cpu"
    image = fn.decoders.image(pos, device=device, output_type=types.RGB)
    twin = fn.decoders.image(neg, device=device, output_type=types.RGB)
    labels = fn.decoders.image(mask, device=device, output_type=types.GRAY)
    # The largest label other than ignore, over the whole mask: checked against the number of
    # classes after the pipeline (the crop may have cut the offending pixels away).
    top_label = fn.reductions.max(labels * (labels != IGNORE_INDEX))

    shape = fn.cast(shapes[0], dtype=types.FLOAT)
    h, w = shape[0], shape[1]
    S = float(aug.size)
    if aug.enabled:
        s = fn.random.uniform(range=list(aug.scale))
        log_ratio = [math.log(r) for r in aug.ratio]
        stretch = dmath.sqrt(dmath.exp(fn.random.uniform(range=log_ratio))) if log_ratio[0] < log_ratio[1] \
            else math.sqrt(aug.ratio[0])
        u_top, u_left = fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])
        flip = fn.random.coin_flip(probability=aug.flip_prob)
        k = (aug.base_size or aug.size) * s / dmath.min(h, w)
    else:
        stretch, u_top, u_left, flip = 1.0, 0.5, 0.5, 0
        k = S / dmath.min(h, w)
    rh = dmath.max(dmath.floor(h * k / stretch + 0.5), 1.0)
    rw = dmath.max(dmath.floor(w * k * stretch + 0.5), 1.0)
    # The window's anchor is crop_pos * (rescaled - S): uniform when the image is larger,
    # 0 (pad at the bottom / right) when it is smaller.
    pos_y, pos_x = u_top * (rh > S), u_left * (rw > S)

    def geometry(x, interp, antialias):
        x = fn.resize(x, resize_x=rw, resize_y=rh, interp_type=interp, antialias=antialias)
        # Flip the rescaled image, then crop: the padding stays at the right whatever the flip.
        return fn.flip(x, horizontal=flip)

    mean = [255.0 * m for m in CLIP_MEAN]
    std = [255.0 * s_ for s_ in CLIP_STD]
    images = [
        fn.crop_mirror_normalize(
            geometry(x, types.INTERP_LINEAR, True), crop=(aug.size, aug.size), crop_pos_x=pos_x, crop_pos_y=pos_y,
            out_of_bounds_policy="pad", fill_values=0.0, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
        for x in (image, twin)
    ]
    labels = fn.crop(geometry(labels, types.INTERP_NN, False), crop=(aug.size, aug.size), crop_pos_x=pos_x,
                     crop_pos_y=pos_y, out_of_bounds_policy="pad", fill_values=float(IGNORE_INDEX))
    return (*images, labels, meta, source, top_label, *shapes)


def _on_gpu(tensors) -> bool:
    """Whether a DALI TensorList (or Tensor) is in GPU memory: with device_id set, the `mixed`
    decoder's outputs and everything computed from them (crops, the label maximum)."""
    from nvidia.dali.backend import TensorGPU, TensorListGPU

    return isinstance(tensors, (TensorListGPU, TensorGPU))


def _host(tensors):
    """A DALI TensorList (or Tensor) in host memory, where numpy can read it.

    numpy cannot read a GPU TensorList (np.array of one is not its data), so it is copied to
    the host with as_cpu(). A CPU TensorList's as_cpu() is the list itself, and DALI versions
    whose CPU lists lack the method get them back unchanged.
    """
    as_cpu = getattr(tensors, "as_cpu", None)
    return tensors if as_cpu is None else as_cpu()


def _numpy(tensors) -> np.ndarray:
    """A dense DALI TensorList, CPU or GPU, as one numpy array [batch, ...]."""
    return np.array(_host(tensors).as_tensor())


def _to_torch(tensors, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList, CPU or GPU, as a torch tensor on `device`."""
    if device.type == "cuda" and _on_gpu(tensors):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        # GPU to GPU without a trip through the host, ordered on torch's current stream.
        dense = tensors.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    # feed_ndarray would write a CPU list's bytes to a CUDA address as if it were host memory,
    # so everything else goes through numpy.
    return torch.from_numpy(_numpy(tensors)).to(device)


def _bytes(tensors) -> list[bytes]:
    return [np.array(t).tobytes() for t in _host(tensors)]


class DaliPairLoader:
    """Batches of (image, twin, mask, classes, key) decoded by DALI; see the module docstring.

    Arguments as `train.data.PairLoader`, plus `device_id` (None: CPU), `num_threads`,
    `shuffle_buffer` (samples DALI shuffles among) and `index_dir` (where the DALI index files
    go; a temporary folder removed with the loader when None).
    """

    def __init__(
        self,
        run_dir: Path | str,
        batch_size: int,
        size: int = 512,
        *,
        device_id: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        even: bool = True,
        augment: bool = True,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (1.0, 1.0),
        flip_prob: float = 0.5,
        base_size: int | None = None,
        vocabulary: Sequence[str] | None = None,
        skip_flagged: bool = True,
        verify: bool = False,
        num_threads: int = 4,
        shuffle_buffer: int = 512,
        prefetch_queue_depth: int = 2,
        index_dir: Path | str | None = None,
        index: SampleIndex | None = None,
    ) -> None:
        self._dali = import_dali()
        if seed < 0:
            raise ValueError(f"seed must be non-negative for DALI (-1 means 'random' there), got {seed}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.index = index if index is not None else build_index(
            run_dir, vocabulary=vocabulary, skip_flagged=skip_flagged, verify=verify)
        n = len(self.index)
        rows = np.arange(n - n % world_size if even else n)
        if len(rows) < world_size:
            raise ValueError(f"{run_dir} has {n} usable samples, fewer than the {world_size} ranks "
                             f"(left out: {dict(self.index.skipped) or 'none'})")
        if index_dir is None:
            index_dir = Path(tempfile.mkdtemp(prefix="magicseg-dali-index-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, index_dir, True)
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._paths, self._index_paths = write_index_files(self.index, rows, self.index_dir)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.aug = Augment(size, tuple(scale), tuple(ratio), flip_prob, base_size, augment)
        self.device_id = device_id
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.num_threads, self.shuffle_buffer = num_threads, shuffle_buffer
        self.prefetch_queue_depth = prefetch_queue_depth
        # DALI's shard r of W holds the samples [N*r//W, N*(r+1)//W) of its epoch order.
        total = len(rows)
        self.samples_per_epoch = total * (rank + 1) // world_size - total * rank // world_size
        self.epoch = 0
        self.batches = 0  # handed out in the current epoch
        self.skipped: Counter = Counter(self.index.skipped)
        self._checkpoint: bytes | None = None
        self._pipe = None

    def __len__(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def _pipeline(self):
        if self._pipe is None:
            dali, fn, types, dmath = self._dali
            pipe = dali.Pipeline(
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                # Augmentation draws differ per rank; the reader's seeds above do not.
                seed=self.seed * 1009 + self.rank + 1, prefetch_queue_depth=self.prefetch_queue_depth,
                enable_checkpointing=True, checkpoint=self._checkpoint,
            )
            with pipe:
                pipe.set_outputs(*_graph(
                    fn, types, dmath, paths=self._paths, index_paths=self._index_paths, aug=self.aug,
                    rank=self.rank, world_size=self.world_size, seed=self.seed, shuffle=self.shuffle,
                    shuffle_buffer=self.shuffle_buffer, gpu=self.device_id is not None))
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; the state moves on as each batch is handed out."""
        pipe = self._pipeline()
        batches = len(self)
        while self.batches < batches:
            outputs = pipe.run()
            # pad_last_batch repeats the shard's last sample to fill the epoch's last batch.
            count = min(self.batch_size, self.samples_per_epoch - self.batches * self.batch_size)
            self.batches += 1
            if self.batches == batches:
                self.epoch, self.batches = self.epoch + 1, 0
            batch = self._convert(outputs, count)
            if batch is not None:
                yield batch
            if self.batches == 0:
                return

    def _convert(self, outputs, count: int) -> dict | None:
        image, twin, labels, meta, source, top_label, *shapes = outputs
        classes, keys, good = [], [], []
        # On a GPU the label maximum comes from the GPU-decoded mask; the shapes are peeked on
        # the CPU. Both are read through _numpy, which handles either.
        top = _numpy(top_label).reshape(-1)
        shape_rows = [_numpy(s) for s in shapes]
        for i, (meta_bytes, src) in enumerate(zip(_bytes(meta)[:count], _bytes(source)[:count])):
            key = src.decode("utf-8", "replace").rsplit(":", 1)[-1].partition(".")[0]
            names = json.loads(meta_bytes)["classes"]  # validated when indexed
            hw = [tuple(rows[i][:2]) for rows in shape_rows]
            if not hw[0] == hw[1] == hw[2]:
                self._skip("size_mismatch", f"sample {key}: pos, neg, mask sizes {hw}")
            elif top[i] > len(names):
                self._skip("bad_mask", f"sample {key}: label {top[i]} but only {len(names)} classes")
            else:
                classes.append(list(names))
                keys.append(key)
                good.append(i)
        if not keys:
            return None
        rows = torch.tensor(good, dtype=torch.int64, device=self.device)
        return {
            "image": _to_torch(image, self.device)[rows],
            "twin": _to_torch(twin, self.device)[rows],
            "mask": _to_torch(labels, self.device)[rows, ..., 0].to(torch.int64),
            "classes": classes,
            "key": keys,
        }

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipping %s: %s", detail, reason)

    def state_dict(self) -> dict:
        """{"epoch", "batches" (handed out in it), "dali" (DALI's checkpoint bytes), ...}."""
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {
            "epoch": self.epoch, "batches": self.batches, "dali": checkpoint, "seed": self.seed,
            "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
            "samples": len(self.index), "fingerprint": self.index.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; ValueError if it was saved by a differently set-up loader."""
        ours = self.state_dict()
        for name in ("seed", "world_size", "rank", "batch_size", "samples", "fingerprint"):
            if state.get(name) != ours[name]:
                raise ValueError(f"loader state has {name}={state.get(name)!r}, this loader {ours[name]!r}: "
                                 "DALI's checkpoint only resumes the same pipeline over the same samples")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._checkpoint = state["dali"]
        self._pipe = None  # rebuilt from the checkpoint on the next iteration

    def close(self) -> None:
        """Release the pipeline and remove the temporary index files."""
        self._pipe = None
        cleanup = getattr(self, "_cleanup", None)
        if cleanup is not None:
            cleanup()
