"""The UNet alone: rows per second and TFLOP/s against batch size, with the reference's batch as baseline.

One denoising step of the reference is a UNet call on 2 latent rows (one image, conditional
and unconditional); the engine calls it on 4 rows per pair (positive and negative, each with
both). Timing the same UNet at growing row counts shows how far batching goes before the
device is full, and FLOPs counted on the real module give the fraction of the dense peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from magicseg_engine.bench.common import count_flops, dense_peak_tflops, environment, summarise
from magicseg_engine.bench.generate import unet_step_times, zero_conditions
from magicseg_engine.generate.sampler import PairedSampler

REFERENCE_ROWS = 2


@torch.inference_mode()
def unet_flops_per_row(sampler: PairedSampler) -> int:
    """FLOPs of one latent row through the UNet (the count is linear in the rows)."""
    latents = torch.zeros(1, *sampler.latent_shape, device=sampler.device, dtype=sampler.dtype)
    context, added = zero_conditions(sampler, 1)
    return count_flops(lambda: sampler.models.unet(latents, torch.tensor(500, device=sampler.device),
                                                   encoder_hidden_states=context, added_cond_kwargs=added))


def bench_unet(sampler: PairedSampler, pair_batches: Sequence[int] = (1, 2, 4, 8), warmup: int = 1,
               reps: int = 3) -> dict:
    """Rows/s, TFLOP/s and peak memory of one UNet call at the reference's 2 rows and at 4 x each batch."""
    device = sampler.device
    flops = unet_flops_per_row(sampler)
    peak = dense_peak_tflops(device)
    rows_list = [REFERENCE_ROWS, *(4 * b for b in pair_batches)]
    rows_out = []
    for rows in dict.fromkeys(rows_list):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = summarise(unet_step_times(sampler, rows, warmup, reps))
        tflops = rows * flops / timing["median_s"] / 1e12
        rows_out.append({
            "rows": rows, "pairs": rows // 4 if rows != REFERENCE_ROWS else None, **timing,
            "rows_per_s": rows / timing["median_s"], "tflops_per_s": tflops,
            "fraction_of_peak": tflops / peak if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        })
    baseline = rows_out[0]
    best = max(rows_out[1:], key=lambda r: r["rows_per_s"])
    s = sampler.settings
    return {
        "benchmark": "unet",
        **environment(device),
        "settings": {"height": s.height, "width": s.width, "dtype": str(sampler.dtype).removeprefix("torch."),
                     "model": sampler.models.model_id, "warmup": warmup, "reps": reps},
        "flops_per_row": flops,
        "dense_peak_tflops": peak,
        "baseline": baseline,
        "rows": rows_out,
        "best": best,
        "speedup": best["rows_per_s"] / baseline["rows_per_s"],
    }
