"""What masks cost: denoising with attention capture against without, and batched SAM
refinement against SamPredictor one image and one prompt at a time, on the same inputs."""

from __future__ import annotations

import torch

from magicseg_engine.bench.common import environment, summarise, time_calls
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.sampler import PairedSampler
from magicseg_engine.kernels.mask_extract import extract_masks
from magicseg_engine.masks.sam import SamRefiner


def bench_capture(sampler: PairedSampler, prompts, negatives, seeds, classes, warmup: int, reps: int,
                  use_triton: bool | None = None) -> dict:
    """Seconds to denoise one batch without capture and with it installed (kernel or reference)."""
    capture = AttentionCapture(sampler.models.unet, sampler.models.tokenizer, use_triton=use_triton)
    capture.set_prompts(prompts, classes)
    plain = time_calls(lambda: sampler.denoise(prompts, negatives, seeds), sampler.device, warmup, reps)

    def captured() -> None:
        with capture.installed():
            sampler.denoise(prompts, negatives, seeds, hook=capture)
        capture.maps()

    with_capture = time_calls(captured, sampler.device, warmup, reps)
    return {
        "pairs": len(prompts), "layers": len(capture.layers),
        "kernel": "triton" if (use_triton if use_triton is not None else sampler.device.type == "cuda") else "torch reference",
        "without_capture": summarise(plain), "with_capture": summarise(with_capture),
        "overhead": summarise(with_capture)["median_s"] / summarise(plain)["median_s"] - 1.0,
    }


def bench_sam(refiner: SamRefiner, images, maps: torch.Tensor, valid: torch.Tensor, warmup: int, reps: int) -> dict:
    """Batched refinement against the one-at-a-time SamPredictor loop, same prompts."""
    extracted = extract_masks(maps, valid, images.shape[1:3])
    p = extracted.prompts
    args = (images, p.boxes, p.points, p.point_labels, extracted.class_masks)
    batched = time_calls(lambda: refiner(*args), refiner.device, warmup, reps)
    one_by_one = time_calls(lambda: refiner.refine_one_by_one(*args), refiner.device, warmup, reps)
    return {
        "images": int(images.shape[0]), "classes_per_image": int(valid.sum(1).float().mean()),
        "batched": summarise(batched), "one_by_one": summarise(one_by_one),
        "speedup": summarise(one_by_one)["median_s"] / summarise(batched)["median_s"],
    }


def captured_batch(sampler: PairedSampler, prompts, negatives, seeds, classes):
    """(positive images, attention maps [B, C, h, w], valid classes [B, C]) of one rendered batch."""
    capture = AttentionCapture(sampler.models.unet, sampler.models.tokenizer)
    capture.set_prompts(prompts, classes)
    with capture.installed():
        batch = sampler(prompts, negatives, seeds, hook=capture)
    maps = capture.maps()[:, 0]
    valid = torch.zeros(maps.shape[:2], dtype=torch.bool, device=maps.device)
    for i, names in enumerate(classes):
        valid[i, : len(names)] = True
    return batch.positives, maps, valid


def bench_sam_refinement(sampler: PairedSampler, refiner: SamRefiner, prompts, negatives, seeds, classes,
                         warmup: int = 1, reps: int = 3) -> dict:
    """`bench_sam` on a batch the sampler renders with attention capture."""
    images, maps, valid = captured_batch(sampler, prompts, negatives, seeds, classes)
    return {"benchmark": "sam", **environment(sampler.device), **bench_sam(refiner, images, maps, valid, warmup, reps)}


def bench_masks(sampler: PairedSampler, refiner: SamRefiner, prompts, negatives, seeds, classes,
                warmup: int = 1, reps: int = 3) -> dict:
    device = sampler.device
    images, maps, valid = captured_batch(sampler, prompts, negatives, seeds, classes)
    result = {"benchmark": "masks", **environment(device),
              "capture": bench_capture(sampler, prompts, negatives, seeds, classes, warmup, reps),
              "sam": bench_sam(refiner, images, maps, valid, warmup, reps)}
    if device.type == "cuda":
        result["capture_torch_reference"] = bench_capture(sampler, prompts, negatives, seeds, classes, warmup, reps,
                                                          use_triton=False)
    return result
