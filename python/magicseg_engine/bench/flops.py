"""What a guided pair costs in each model family, and the ceiling that puts on pairs/s per GPU.

FLOPs are counted with torch's flop counter on the presets' real architectures built on the
meta device: shapes only, no weights, no memory, seconds on any machine. A pair is the
sampler's work for one positive and its counterfactual at the preset's native size: the text
encoder(s) on three prompts (positive, negative, the empty prompt, shared by a batch but
counted whole here), `steps` UNet calls on 4 rows (both images, conditional and
unconditional), and two VAE decodes. Attention capture, SAM and writing are not in it. The
ceiling is a GPU's dense tensor-core peak divided by that count: no run can beat it, and the
measured fraction of it (`bench unet`, `bench tune`) says how far a run is from it.

The baseline is the first preset (SD 1.5, the reference's model): each family's ratio is how
many times SD 1.5's work one of its pairs is.
"""

from __future__ import annotations

from collections.abc import Sequence

from magicseg_engine.bench.common import DENSE_PEAK_TFLOPS, environment
from magicseg_engine.errors import UsageError

FAMILY_PRESETS = ("sd15-random", "sd21-random", "sdxl-random")
# The data-sheet GPUs the ceiling table lists (names as DENSE_PEAK_TFLOPS keys them).
CEILING_GPUS = ("H100 SXM", "H200", "A100", "L40S")


def count_pair_flops(preset: str, steps: int | None = None) -> dict:
    """FLOPs of one guided pair of `preset` at its native size (see the module docstring)."""
    from magicseg_engine.bench.generate import pair_flops
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_sampler

    # float32: the count does not depend on the dtype, and meta tensors take any.
    config = load_preset(preset, {"diffusion": {"steps": steps, "dtype": "float32"}})
    if config.diffusion.weights == "pretrained":
        raise UsageError(f"bench flops counts architectures, and preset {preset} loads a folder of weights; "
                         "name the family's random preset instead (sd15-random, sd21-random, sdxl-random)")
    sampler = build_sampler(config, "meta")
    counts = pair_flops(sampler)
    s, m = sampler.settings, sampler.models
    pair = counts["pair"]
    return {
        "preset": preset, "family": m.family, "height": s.height, "width": s.width, "steps": s.steps,
        "latent_shape": list(sampler.latent_shape),
        "parameters": {name: sum(p.numel() for p in module.parameters())
                       for name, module in (("unet", m.unet), ("vae", m.vae), ("text_encoder", m.text_encoder),
                                            ("text_encoder_2", m.text_encoder_2)) if module is not None},
        "unet_tflops_per_row": counts["unet_call_4_rows"] / 4 / 1e12,
        "vae_decode_tflops": counts["vae_decode_1_image"] / 1e12,
        "text_encoder_tflops": counts["text_encoder_1_prompt"] / 1e12,
        "pair_tflops": pair / 1e12,
        "unet_share": s.steps * counts["unet_call_4_rows"] / pair,
        "ceiling_pairs_per_s": {gpu: DENSE_PEAK_TFLOPS[gpu] * 1e12 / pair for gpu in CEILING_GPUS},
    }


def bench_flops(presets: Sequence[str] = FAMILY_PRESETS, steps: int | None = None) -> dict:
    """count_pair_flops of each preset, each against the first."""
    presets = tuple(presets)
    if not presets:
        raise UsageError("--presets is empty; name at least one preset, e.g. sd15-random,sdxl-random")
    rows = [count_pair_flops(p, steps) for p in presets]
    for row in rows:
        row["vs_first"] = row["pair_tflops"] / rows[0]["pair_tflops"]
    import torch

    return {"benchmark": "flops", **environment(torch.device("cpu")), "baseline": presets[0],
            "peaks_tflops": {gpu: DENSE_PEAK_TFLOPS[gpu] for gpu in CEILING_GPUS}, "rows": rows}
