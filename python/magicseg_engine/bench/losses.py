"""The pretraining losses alone: fused Triton kernels against the torch references, forward + backward.

Shapes are those of one pretraining step of the preset: the pixel embeddings at the loss
resolution (1/`loss_stride` of the crop), the candidate classes and the embedding width, once
per decoder layer as the objective calls them. On a CPU the kernels would run interpreted,
which measures the interpreter, so there only the references are timed.
"""

from __future__ import annotations

import torch

from magicseg_engine.bench.common import environment, summarise, sync, time_calls
from magicseg_engine.kernels.counterfactual_loss import counterfactual_loss
from magicseg_engine.kernels.segmentation_loss import segmentation_losses

GPU_ONLY = "the fused Triton kernels are measured on a GPU; here they would run interpreted"


def _inputs(preset: str, device: torch.device, seed: int = 0):
    from magicseg_engine.train.loop import load_pretrain_preset

    config = load_pretrain_preset(preset)
    b, k, e = config.batch_size, config.candidates, config.model.embed_dim
    side = config.model.image_size // config.loss_stride
    g = torch.Generator().manual_seed(seed)
    pixels = torch.nn.functional.normalize(torch.randn(b, side * side, e, generator=g), dim=-1) * 10.0
    classes = torch.nn.functional.normalize(torch.randn(b, k, e, generator=g), dim=-1)
    labels = torch.randint(-1, 3, (b, side * side), generator=g)
    g_pos, g_neg = torch.randn(b, e, generator=g), torch.randn(b, e, generator=g)
    dtype = torch.bfloat16 if config.precision == "bf16" and device.type == "cuda" else torch.float32
    tensors = [t.to(device, dtype).requires_grad_() for t in (pixels, classes, g_pos, g_neg)]
    return config, tensors[0], tensors[1], labels.to(device, torch.int32), tensors[2], tensors[3]


def _time(fn, device: torch.device, warmup: int, reps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = summarise(time_calls(fn, device, warmup, reps))
    sync(device)
    timing["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return timing


def bench_losses(preset: str, device: torch.device, warmup: int = 2, reps: int = 5) -> dict:
    config, pixels, classes, labels, g_pos, g_neg = _inputs(preset, device)
    layers = config.model.decoder_layers

    def mask_losses(fused: bool):
        def step() -> None:
            total = 0.0
            for _ in range(layers):
                focal, dice = segmentation_losses(pixels, classes, labels, logit_scale=1.0, use_triton=fused)
                total = total + focal + dice
            total.backward()
        return step

    def hinge(fused: bool):
        return lambda: counterfactual_loss(g_pos, g_neg, use_triton=fused).backward()

    result = {
        "benchmark": "losses", **environment(device), "preset": preset,
        "shapes": {"batch": pixels.shape[0], "pixels": pixels.shape[1], "candidates": classes.shape[1],
                   "embed_dim": pixels.shape[2], "decoder_layers": layers, "dtype": str(pixels.dtype).removeprefix("torch."),
                   "warmup": warmup, "reps": reps},
    }
    for name, make in (("segmentation", mask_losses), ("counterfactual", hinge)):
        entry = {"eager": _time(make(False), device, warmup, reps)}
        if device.type == "cuda":
            entry["fused"] = _time(make(True), device, warmup, reps)
            entry["speedup"] = entry["eager"]["median_s"] / entry["fused"]["median_s"]
        else:
            entry["fused"] = {"skipped": GPU_ONLY}
            entry["speedup"] = None
        result[name] = entry
    return result
