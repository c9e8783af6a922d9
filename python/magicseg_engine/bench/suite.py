"""Every benchmark by name, run alone or all together, each with its baseline and one headline ratio.

`run_bench(name, context)` runs one of `BENCHES`; `run_all` runs them in order and adds a
summary: for each, what was compared, our number, the baseline's and their ratio. The models
of a preset are built once per `BenchContext` and shared by the benchmarks that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from magicseg_engine.bench.common import environment

# The full reason is in each result's "skipped" field; the summary line stays short.
GPU_ONLY_NOTE = "GPU only (Triton would run interpreted)"


@dataclass
class BenchContext:
    preset: str
    device: torch.device
    warmup: int = 1
    reps: int = 3
    pairs: int = 8
    batch_size: int = 8
    # The diffusers folder or hub id of presets that load one (sd15, sd21, sdxl).
    model: str | None = None
    # The seed of the preset's random weights (generate --weights-seed).
    weights_seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def config(self):
        from magicseg_engine.config import load_preset

        return load_preset(self.preset, {"weights_seed": self.weights_seed, "diffusion": {"model": self.model}})

    @cached_property
    def sampler(self):
        from magicseg_engine.pipeline import build_sampler

        return build_sampler(self.config, str(self.device))

    @cached_property
    def mask_stage(self):
        """The run's mask stage (attention capture + annotator), as `generate` builds it."""
        from magicseg_engine.pipeline import build_mask_stage

        return build_mask_stage(self.config, self.sampler)

    @property
    def refiner(self):
        """The mask stage's SAM (the presets always refine with it): one SAM for every benchmark."""
        return self.mask_stage.annotator.refiner

    def prompt_records(self, n: int):
        """`n` prompt records over the preset's classes (`common.bench_vocabulary`), the same ones
        for every benchmark of the run."""
        if n not in self._cache:
            from magicseg_engine.bench.common import bench_vocabulary
            from magicseg_engine.prompts import build_prompts

            self._cache[n] = build_prompts(self.config.prompts, vocab=bench_vocabulary(self.config), num=n).records
        return self._cache[n]

    def records(self, n: int):
        """`prompt_records(n)` as columns: (prompts, negatives, seeds, classes)."""
        records = self.prompt_records(n)
        return ([r.prompt for r in records], [r.negative_prompt for r in records],
                [r.seed for r in records], [tuple(r.classes) for r in records])


def _generate(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.generate import bench_generate

    prompts, negatives, seeds, _ = ctx.records(ctx.pairs)
    result = bench_generate(ctx.sampler, prompts, negatives, seeds, ctx.batch_size, ctx.warmup, ctx.reps)
    result["settings"]["preset"] = ctx.preset
    return result


def _unet(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.unet import bench_unet

    batches = sorted({1, 2, 4, ctx.batch_size})
    return bench_unet(ctx.sampler, batches, ctx.warmup, ctx.reps)


def _pipeline(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.pipeline import bench_pipeline

    batches = sorted({1, 2, 4, ctx.batch_size})
    return bench_pipeline(ctx.config, ctx.sampler, ctx.mask_stage, ctx.prompt_records(ctx.pairs), batches,
                          (1, 2, 4), ctx.warmup, ctx.reps)


def _masks(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.masks import bench_masks

    pairs = min(ctx.pairs, 4)
    return bench_masks(ctx.sampler, ctx.refiner, *ctx.records(pairs), warmup=ctx.warmup, reps=ctx.reps)


def _sam(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.masks import bench_sam_refinement

    pairs = min(ctx.pairs, 4)
    return bench_sam_refinement(ctx.sampler, ctx.refiner, *ctx.records(pairs), warmup=ctx.warmup, reps=ctx.reps)


def _losses(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.losses import bench_losses

    return bench_losses(ctx.preset, ctx.device, ctx.warmup, ctx.reps)


def _loader(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.pretrain import bench_loader

    return bench_loader(ctx.preset, ctx.device)


def _train(ctx: BenchContext) -> dict:
    from magicseg_engine.bench.pretrain import bench_train

    return bench_train(ctx.preset, ctx.device, warmup=ctx.warmup, reps=ctx.reps)


# In the order `all` runs them: each builds on models the one before has built.
BENCHES: dict[str, Callable[[BenchContext], dict]] = {
    "generate": _generate, "unet": _unet, "pipeline": _pipeline, "masks": _masks, "sam": _sam,
    "losses": _losses, "loader": _loader, "train": _train,
}


def run_bench(name: str, ctx: BenchContext) -> dict:
    result = BENCHES[name](ctx)
    result.setdefault("preset", ctx.preset)
    result["headline"] = headline(name, result)
    return result


def run_all(ctx: BenchContext, on_result: Callable[[str, dict], None] | None = None) -> dict:
    results = {}
    for name in BENCHES:
        results[name] = run_bench(name, ctx)
        if on_result is not None:
            on_result(name, results[name])
    return {"benchmark": "all", **environment(ctx.device), "preset": ctx.preset,
            "settings": {"warmup": ctx.warmup, "reps": ctx.reps, "pairs": ctx.pairs, "batch_size": ctx.batch_size},
            "summary": [results[n]["headline"] for n in BENCHES], "results": results}


def headline(name: str, r: dict) -> dict:
    """{bench, compared, ours, baseline, unit, ratio}: one line per benchmark, ratio None when the
    comparison cannot run on this device (`note` says why)."""
    def row(compared, ours, baseline, unit, ratio, note=None):
        return {"bench": name, "compared": compared, "ours": ours, "baseline": baseline, "unit": unit,
                "ratio": ratio, "note": note}

    if name == "generate":
        return row("paired sampler vs batch-1 loop", r["engine"]["pairs_per_s"],
                   r["reference"]["pairs_per_s"], "pairs/s", r["speedup"])
    if name == "fast":
        first = r["levels"][0]
        iou = "n/a" if first["mask_iou"] is None else f"{first['mask_iou']:.3f}"
        return row(f"fast level {first['level']} vs full mode", first["pairs_per_s"], r["full"]["pairs_per_s"],
                   "pairs/s", first["speedup"], f"mask IoU {iou} against full mode")
    if name == "pipeline":
        best = r["best"]
        return row("prompts to shards vs reference pipeline", best["pairs_per_s"], r["reference"]["pairs_per_s"],
                   "pairs/s", r["speedup"], f"batch {best['batch_size']}, {best['encode_workers']} encoders")
    if name == "unet":
        return row(f"UNet, {r['best']['rows']} rows vs 2", r["best"]["rows_per_s"],
                   r["baseline"]["rows_per_s"], "rows/s", r["speedup"],
                   None if r["best"]["fraction_of_peak"] is None
                   else f"{100 * r['best']['fraction_of_peak']:.1f}% of the dense peak")
    if name == "masks":
        capture = r["capture"]
        return row("denoise with capture vs without", 1 / capture["with_capture"]["median_s"],
                   1 / capture["without_capture"]["median_s"], "batches/s", 1 / (1 + capture["overhead"]),
                   capture["kernel"])
    if name == "sam":
        return row("batched SAM vs one at a time", 1 / r["batched"]["median_s"],
                   1 / r["one_by_one"]["median_s"], "batches/s", r["speedup"])
    if name == "losses":
        seg = r["segmentation"]
        if seg["speedup"] is None:
            return row("fused losses vs torch", None, 1 / seg["eager"]["median_s"], "steps/s", None,
                       GPU_ONLY_NOTE)
        return row("fused losses vs torch", 1 / seg["fused"]["median_s"], 1 / seg["eager"]["median_s"],
                   "steps/s", seg["speedup"])
    if name == "loader":
        loaders = r["loaders"]
        dali = loaders.get("dali", {})
        if "images_per_s" not in dali:
            return row("DALI vs torch loader", None, loaders["torch"]["images_per_s"], "images/s", None,
                       dali.get("skipped"))
        return row("DALI vs torch loader", dali["images_per_s"], loaders["torch"]["images_per_s"], "images/s",
                   loaders["dali_speedup"])
    if name == "train":
        step = r["step"]
        if step["fused_speedup"] is None:
            return row("train step, fused vs eager", None, step["eager"]["images_per_s"], "images/s",
                       None, GPU_ONLY_NOTE)
        return row("train step, fused vs eager", step["fused"]["images_per_s"],
                   step["eager"]["images_per_s"], "images/s", step["fused_speedup"])
    if name == "tune":
        best, unet = r["best"], r["unet_best"]
        frac = unet["fraction_of_peak"]
        return row("best variant, prompts to shards vs reference pipeline", best["pairs_per_s"],
                   r["reference"]["pairs_per_s"], "pairs/s", r["speedup"],
                   f"{best['variant']} at batch {best['batch_size']}; UNet {unet['tflops_per_s']:.3g} TFLOP/s"
                   + ("" if frac is None else f", {100 * frac:.1f}% of the dense peak"))
    raise KeyError(name)
