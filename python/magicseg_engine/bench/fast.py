"""What fast mode buys and what it costs: the same pairs rendered with the full UNet at every step
and with each fast level (`generate.fast`), timed, and compared map for map and mask for mask.

Fast mode changes the images a seed gives, slightly; for a dataset what matters is whether the
masks move. Against full mode on the same prompts and seeds, each level reports:

- pairs/s of rendering with attention capture installed (denoise and decode), and the speed-up;
- `map_cosine`: the cosine similarity of each class's attention map, positives and negatives;
- `mask_iou`: IoU of each class's binary mask of the positive image, extracted from the maps as
  the mask stage does (`extract_masks`), averaged over the classes that have a mask in either
  mode; `label_agreement`: the fraction of pixels whose label (class or background) is the same;
- `image_psnr`: PSNR of the fast images against the full ones, in dB over 8-bit pixels.

Each level is a `PairedSampler` of the same models and runners with its `fast` setting, so
this runs on any sampler of the torch backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from magicseg_engine.bench.common import environment, sync
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.fast import FAST_LEVELS
from magicseg_engine.generate.sampler import PairBatch, PairedSampler
from magicseg_engine.kernels.mask_extract import extract_masks


class _Mode:
    """One way of rendering the batch: the sampler at one fast level, and a capture of the given
    options; `render()` gives the images and maps."""

    def __init__(self, sampler: PairedSampler, level: int, prompts, negatives, seeds, classes, capture_options: dict):
        sampler = PairedSampler(sampler.models, replace(sampler.settings, fast=level), sampler.device,
                                sampler.dtype, runners=sampler.runners)
        self.cache = sampler.feature_cache
        self.sampler = sampler
        self.args = (prompts, negatives, seeds)
        self.capture = AttentionCapture(sampler.models.unet, sampler.models.tokenizer, **capture_options)
        self.capture.set_prompts(prompts, classes)
        self.seconds: list[float] = []

    def render(self) -> tuple[PairBatch, torch.Tensor]:
        with self.capture.installed():
            batch = self.sampler(*self.args, hook=self.capture)
        return batch, self.capture.maps()

    def time_once(self) -> None:
        device = self.sampler.device
        sync(device)
        t0 = time.perf_counter()
        self.render()
        sync(device)
        self.seconds.append(time.perf_counter() - t0)

    @property
    def steps(self) -> tuple[int, int]:
        """(full, cached) steps of the last run."""
        if self.cache is None:
            return self.sampler.settings.steps, 0
        return self.cache.full_steps, self.cache.cached_steps


def _valid(classes: Sequence[Sequence[str]], width: int, device) -> torch.Tensor:
    valid = torch.zeros((len(classes), width), dtype=torch.bool, device=device)
    for i, names in enumerate(classes):
        valid[i, : len(names)] = True
    return valid


def map_cosine(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean cosine similarity of the valid classes' maps, a and b [B, 2, C, h, w], both images."""
    cos = F.cosine_similarity(a.flatten(3).float(), b.flatten(3).float(), dim=-1, eps=1e-12)  # [B, 2, C]
    return float(cos[valid[:, None, :].expand_as(cos)].mean())


def mask_agreement(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, size: tuple[int, int],
                   threshold: float | str) -> dict:
    """IoU per class and label agreement of the masks extracted from two sets of maps [B, C, h, w]."""
    ma = extract_masks(a, valid, size, threshold)
    mb = extract_masks(b, valid, size, threshold)
    inter = (ma.class_masks & mb.class_masks).flatten(2).sum(-1)
    union = (ma.class_masks | mb.class_masks).flatten(2).sum(-1)
    scored = valid & (union > 0)
    ious = inter[scored].float() / union[scored].float()
    return {"mask_iou": float(ious.mean()) if ious.numel() else None, "masks_scored": int(scored.sum()),
            "label_agreement": float((ma.labels == mb.labels).float().mean())}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image arrays; inf when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def fast_mode_agreement(sampler: PairedSampler, prompts: Sequence[str], negatives: Sequence[str],
                        seeds: Sequence[int], classes: Sequence[Sequence[str]], levels: Sequence[int] = (1, 2),
                        *, capture_options: dict | None = None, threshold: float | str = "otsu",
                        warmup: int = 1, reps: int = 3) -> dict:
    """Full mode against each fast level in `levels` on one batch (same prompts, seeds, capture).

    `capture_options` are AttentionCapture's keyword arguments (steps, factors, ...), as the
    run's mask settings give them; `threshold` is the mask threshold (a value or "otsu").
    Each mode renders `max(warmup, 1)` times untimed (the first rendering is the one compared),
    then `reps` timed times, the modes taking turns.
    """
    unknown = [lv for lv in levels if lv not in FAST_LEVELS or FAST_LEVELS[lv] is None]
    if unknown:
        raise ValueError(f"not fast levels: {unknown}; choose from {sorted(k for k, v in FAST_LEVELS.items() if v)}")
    options = dict(capture_options or {})
    pairs = len(prompts)
    modes = [_Mode(sampler, level, prompts, negatives, seeds, classes, options) for level in (0, *levels)]
    results = [mode.render() for mode in modes]  # also the warm-up of every mode
    for _ in range(warmup - 1):
        for mode in modes:
            mode.render()
    # Round-robin, so that a machine whose load drifts slows every mode alike.
    for _ in range(reps):
        for mode in modes:
            mode.time_once()
    (full_batch, full_maps), base = results[0], modes[0]
    valid = _valid(classes, full_maps.shape[2], full_maps.device)
    size = tuple(full_batch.positives.shape[1:3])
    reference = np.concatenate([full_batch.positives, full_batch.negatives])
    base_s = float(np.median(base.seconds))
    rows = []
    for level, mode, (batch, maps) in zip(levels, modes[1:], results[1:]):
        seconds = float(np.median(mode.seconds))
        schedule = FAST_LEVELS[level]
        full_steps, cached_steps = mode.steps
        rows.append({
            "level": level, "interval": schedule.interval, "shallow_blocks": schedule.shallow_blocks,
            "full_steps": full_steps, "cached_steps": cached_steps,
            "pairs_per_s": pairs / seconds, "speedup": base_s / seconds,
            "map_cosine": map_cosine(full_maps, maps, valid),
            **mask_agreement(full_maps[:, 0], maps[:, 0], valid, size, threshold),
            "image_psnr": psnr(np.concatenate([batch.positives, batch.negatives]), reference),
        })
    s = sampler.settings
    return {"benchmark": "fast", "pairs": pairs, "steps": s.steps, "scheduler": s.scheduler, "guidance": s.guidance,
            "size": [s.height, s.width], "threshold": threshold,
            "capture": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "full": {"pairs_per_s": pairs / base_s, "seconds": base.seconds}, "levels": rows,
            **environment(sampler.device)}


def fast_bench(config, device, levels: Sequence[int], pairs: int, reps: int = 3) -> dict:
    """`bench fast` for a run configuration: `pairs` prompts of its vocabulary, its sampler without
    a mask stage, and the capture and threshold of its mask settings."""
    from magicseg_engine.bench.common import bench_vocabulary
    from magicseg_engine.pipeline import build_sampler
    from magicseg_engine.prompts import build_prompts

    records = build_prompts(config.prompts, vocab=bench_vocabulary(config), num=pairs).records
    sampler = build_sampler(config.model_copy(update={"masks": config.masks.model_copy(update={"source": "none"})}),
                            device)
    m = config.masks
    options = {"steps": m.capture_steps, "factors": m.attention_factors, "self_attention_power": m.self_attention_power}
    return fast_mode_agreement(sampler, [r.prompt for r in records], [r.negative_prompt for r in records],
                               [r.seed for r in records], [tuple(r.classes) for r in records], levels,
                               capture_options=options, threshold=m.threshold, reps=reps)
