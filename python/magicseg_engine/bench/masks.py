"""What masks cost: denoising with attention capture against without, and batched SAM
refinement against SamPredictor one image and one prompt at a time, on the same inputs."""

from __future__ import annotations

import time

import torch

from magicseg_engine.bench.common import environment, summarise, sync, time_calls
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.sampler import PairedSampler
from magicseg_engine.kernels import attention_capture as kernel
from magicseg_engine.kernels.mask_extract import extract_masks
from magicseg_engine.masks.sam import SamRefiner


def bench_capture(sampler: PairedSampler, prompts, negatives, seeds, classes, warmup: int, reps: int,
                  use_triton: bool | None = None) -> dict:
    """Seconds to denoise one batch without capture, with it (positives and negatives, as
    generate reads them) and with the positives only (read_negatives=False).

    The three take turns rep by rep, so a machine whose load drifts slows each alike; the
    overheads are each captured median over the uncaptured one, minus 1: the fraction of a
    denoising step that capture adds. On the CPU the process's CPU seconds are reported beside
    the wall seconds, since other work on a shared machine moves wall time most.
    """
    modes = {"without_capture": None,
             "with_capture": AttentionCapture(sampler.models.unet, sampler.models.tokenizer, use_triton=use_triton),
             "positives_only": AttentionCapture(sampler.models.unet, sampler.models.tokenizer, use_triton=use_triton,
                                                read_negatives=False)}

    def run(capture) -> None:
        if capture is None:
            sampler.denoise(prompts, negatives, seeds)
            return
        capture.set_prompts(prompts, classes)
        with capture.installed():
            sampler.denoise(prompts, negatives, seeds, hook=capture)
        capture.maps()

    for _ in range(warmup):
        for capture in modes.values():
            run(capture)
    wall: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(reps):
        for name, capture in modes.items():
            sync(sampler.device)
            w0, c0 = time.perf_counter(), time.process_time()
            run(capture)
            sync(sampler.device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    plain = summarise(wall["without_capture"])["median_s"]
    plain_cpu = summarise(cpu["without_capture"])["median_s"]
    capture = modes["with_capture"]
    triton = use_triton if use_triton is not None else (sampler.device.type == "cuda" and kernel.triton is not None)
    result = {
        "pairs": len(prompts), "steps": sampler.settings.steps, "size": [sampler.settings.height, sampler.settings.width],
        "layers": len(capture.layers), "factors": sorted(set(capture.layers.values())),
        "kernel": "triton" if triton else "torch (class_attention_layers)",
        **{name: summarise(times) for name, times in wall.items()},
        "overhead": summarise(wall["with_capture"])["median_s"] / plain - 1.0,
        "overhead_positives_only": summarise(wall["positives_only"])["median_s"] / plain - 1.0,
    }
    if sampler.device.type == "cpu":
        result["cpu_seconds"] = {name: summarise(times) for name, times in cpu.items()}
        result["overhead_cpu_seconds"] = summarise(cpu["with_capture"])["median_s"] / plain_cpu - 1.0
        result["threads"] = torch.get_num_threads()
    return result


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


def bench_masks(sampler: PairedSampler, refiner: SamRefiner | None, prompts, negatives, seeds, classes,
                warmup: int = 1, reps: int = 3) -> dict:
    """Capture overhead, and batched SAM against one prompt at a time unless `refiner` is None."""
    device = sampler.device
    result = {"benchmark": "masks", **environment(device),
              "capture": bench_capture(sampler, prompts, negatives, seeds, classes, warmup, reps)}
    if refiner is not None:
        images, maps, valid = captured_batch(sampler, prompts, negatives, seeds, classes)
        result["sam"] = bench_sam(refiner, images, maps, valid, warmup, reps)
    if device.type == "cuda":
        result["capture_torch_reference"] = bench_capture(sampler, prompts, negatives, seeds, classes, warmup, reps,
                                                          use_triton=False)
    return result
