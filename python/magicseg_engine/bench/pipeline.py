"""The whole pipeline, prompts to shards, against the reference's pipeline on the same models.

The reference made a pair in four separate steps, one image at a time: the positive (batch 1,
classifier-free guidance), then the negative from unrelated noise, then an open-vocabulary
detector on the positive, then SAM on each detected box, and wrote the files. Here it is
rebuilt from the same models: `reference_image` for the two images, the run's Grounding DINO
(its `tiny` random model unless a folder is configured) on one image, SAM through
SamPredictor one box at a time, JPEG/PNG encoding and a tar file. A class the detector misses
still gets a SAM call on the whole-image box, so a random detector cannot make the baseline
cheaper than the real one.

The engine side is `render_pairs` itself: paired sampling with attention capture, batched
SAM, the C++ clean-up, encoding on a thread pool and crash-safe shards, measured at several
batch sizes and encoding thread counts.
"""

from __future__ import annotations

import io
import itertools
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from magicseg_engine.bench.common import environment, timed
from magicseg_engine.bench.generate import reference_image
from magicseg_engine.data.encoding import encode_jpeg, encode_png
from magicseg_engine.data.shards import ShardWriter
from magicseg_engine.masks.detector import build_detector
from magicseg_engine.pipeline import ExecutionOptions, MaskStage, keyed_records, render_pairs


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def reference_pipeline(sampler, detector, refiner, records, out: Path, jpeg_quality: int = 95) -> None:
    """The reference's way, pair after pair; see the module docstring."""
    with tarfile.open(out, "w") as tar:
        for i, record in enumerate(records):
            classes = tuple(record.classes)
            positive = reference_image(sampler, record.prompt, record.seed)  # [1, H, W, 3]
            negative = reference_image(sampler, record.negative_prompt, record.seed + 1)
            h, w = positive.shape[1:3]
            boxes = detector(positive, [classes]).boxes.clone()
            missed = (boxes == -1).all(dim=-1)
            boxes[missed] = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])
            points = np.zeros((1, len(classes), 0, 2))
            labels = np.zeros((1, len(classes), 0), dtype=np.int32)
            refined = refiner.refine_one_by_one(positive, boxes, points, labels)
            # The reference merged every class into one binary mask.
            mask = refined.masks[0].any(dim=0).to(torch.uint8).cpu().numpy()
            _add(tar, f"{i:06d}.pos.jpg", encode_jpeg(positive[0], jpeg_quality))
            _add(tar, f"{i:06d}.neg.jpg", encode_jpeg(negative[0], jpeg_quality))
            _add(tar, f"{i:06d}.mask.png", encode_png(mask))


def engine_pipeline(config, sampler, masks, records, out: Path, batch_size: int, encode_workers: int) -> int:
    """`render_pairs` into a fresh run directory; returns the pairs written or flagged."""
    options = ExecutionOptions(device=str(sampler.device), batch_size=batch_size, encode_workers=encode_workers,
                               samples_per_shard=max(1, len(records)))
    with ShardWriter(out, options.samples_per_shard, "bench") as writer:
        result = render_pairs(writer, config, keyed_records(sampler.models.model_id, records), sampler, options, masks)
    return result.generated


def reference_detector(config, device: torch.device):
    """The reference pipeline's detector: the run's Grounding DINO, or the tiny random one."""
    return build_detector(config.masks.detector_model or "tiny", device=device, seed=config.weights_seed,
                          box_threshold=config.masks.box_threshold, text_threshold=config.masks.text_threshold)


def bench_pipeline(config, sampler, masks: MaskStage, records: Sequence, batch_sizes: Sequence[int] = (1, 2, 4, 8),
                   encode_workers: Sequence[int] = (1, 2, 4), warmup: int = 1, reps: int = 3) -> dict:
    """Pairs/s end to end: the engine at each batch size and encoding thread count, and the reference.

    `masks` is the run's mask stage (`pipeline.build_mask_stage`); the reference uses its SAM.
    """
    device = sampler.device
    n = len(records)
    refiner = masks.annotator.refiner
    detector = reference_detector(config, device)
    default_workers = ExecutionOptions().encode_workers
    with tempfile.TemporaryDirectory(prefix="magicseg-bench-pipeline-") as tmp:
        fresh = (Path(tmp) / f"run-{i}" for i in itertools.count())  # every repetition writes a new run

        def engine(batch_size: int, workers: int):
            return lambda rep: engine_pipeline(config, sampler, masks, records, next(fresh), batch_size, workers)

        by_batch = []
        for b in dict.fromkeys(min(b, n) for b in batch_sizes):
            timing = timed(engine(b, default_workers), device, reps, warmup)
            by_batch.append({"batch_size": b, "encode_workers": default_workers, **timing,
                             "pairs_per_s": n / timing["median_s"]})
        best = max(by_batch, key=lambda r: r["pairs_per_s"])
        by_workers = []
        for workers in encode_workers:
            timing = timed(engine(best["batch_size"], workers), device, reps, warmup)
            by_workers.append({"batch_size": best["batch_size"], "encode_workers": workers, **timing,
                               "pairs_per_s": n / timing["median_s"]})
        reference = timed(lambda rep: reference_pipeline(sampler, detector, refiner, records,
                                                          next(fresh).with_suffix(".tar")), device, reps, warmup)
    reference["pairs_per_s"] = n / reference["median_s"]
    best = max(by_batch + by_workers, key=lambda r: r["pairs_per_s"])
    s = sampler.settings
    return {
        "benchmark": "pipeline",
        **environment(device),
        "settings": {"pairs": n, "height": s.height, "width": s.width, "steps": s.steps, "guidance": s.guidance,
                     "dtype": str(sampler.dtype).removeprefix("torch."), "model": sampler.models.model_id,
                     "mask_source": config.masks.source, "detector": config.masks.detector_model or "tiny",
                     "warmup": warmup, "reps": reps},
        "engine_by_batch": by_batch,
        "engine_by_encode_workers": by_workers,
        "best": best,
        "reference": reference,
        "speedup": best["pairs_per_s"] / reference["pairs_per_s"],
    }
