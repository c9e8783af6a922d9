"""The settings that decide GPU throughput, swept end to end against the reference pipeline.

A variant is one way to run the same models: backend (eager `torch` or `compile`, which on a
GPU adds CUDA graphs), precision, the weights' memory layout (`nhwc`, channels-last, or
`nchw`), and the attention kernel scaled_dot_product_attention may use (`auto`, its own
choice, or one of `flash`, `efficient`, `cudnn`, `math`). For each variant the sweep builds the
run's sampler and mask stage as `generate` would, then measures

- the UNet alone at the largest batch: rows/s, TFLOP/s and the fraction of the device's dense
  peak (the FLOP ceiling);
- `render_pairs`, prompts to shards with masks, at every batch size: pairs/s and peak memory.

The reference pipeline (`bench.pipeline.reference_pipeline`: batch 1, independent noise,
detector and SAM one box at a time) runs once, eager and in the preset's precision, as the
reference code ran. The result names the best variant and batch, its ratio over the
reference, and whether the two aims were met: 20x end to end, half the ceiling in the UNet.
A variant that fails (no kernel for that attention choice, out of memory, a compiler error)
is recorded with its error and the sweep goes on.

Written as `VARIANT` strings, `backend:dtype[:layout[:attention]]`, e.g. `compile:bfloat16:nhwc:flash`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from magicseg_engine.bench.common import dense_peak_tflops, environment, summarise, timed
from magicseg_engine.bench.generate import unet_step_times
from magicseg_engine.bench.pipeline import engine_pipeline, reference_detector, reference_pipeline
from magicseg_engine.bench.unet import unet_flops_per_row
from magicseg_engine.engine.backends import ATTENTION_KERNELS
from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)

TUNED_BACKENDS = ("torch", "compile")
DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = {"nhwc": True, "nchw": False}
# The throughput aims: end to end against the reference pipeline, and the UNet against the
# device's dense FLOP ceiling.
AIM_END_TO_END_SPEEDUP = 20.0
AIM_UNET_FRACTION_OF_PEAK = 0.5

GPU_VARIANTS = ("torch:float16:nchw", "torch:float16:nhwc", "torch:bfloat16:nhwc", "torch:bfloat16:nhwc:math",
                "compile:bfloat16:nhwc")
CPU_VARIANTS = ("torch:float32:nchw", "torch:float32:nhwc", "torch:float32:nchw:math")


@dataclass(frozen=True)
class Variant:
    backend: str
    dtype: str
    channels_last: bool
    attention: str = "auto"

    @property
    def name(self) -> str:
        name = f"{self.backend}:{self.dtype}:{'nhwc' if self.channels_last else 'nchw'}"
        return name if self.attention == "auto" else f"{name}:{self.attention}"

    def generate_flags(self, batch_size: int) -> str:
        """The `magicseg-engine generate` options that run this variant at `batch_size`."""
        layout = "--channels-last" if self.channels_last else "--no-channels-last"
        return (f"--backend {self.backend} --dtype {self.dtype} {layout} --attention {self.attention} "
                f"--batch-size {batch_size}")


def parse_variants(text: str, device: torch.device) -> list[Variant]:
    """`backend:dtype[:layout[:attention]]` items separated by commas; a missing layout is NHWC
    on a GPU, NCHW on the CPU (what `generate` uses there); a missing attention is `auto`."""
    variants = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (2, 3, 4):
            raise UsageError(f"--variants {item!r}: write backend:dtype[:layout[:attention]], "
                             "e.g. compile:bfloat16:nhwc")
        backend, dtype = fields[0], fields[1]
        layout = fields[2] if len(fields) >= 3 else ("nhwc" if device.type == "cuda" else "nchw")
        attention = fields[3] if len(fields) == 4 else "auto"
        if backend not in TUNED_BACKENDS:
            raise UsageError(f"--variants {item!r}: backend must be one of {', '.join(TUNED_BACKENDS)} "
                             "(exported backends are measured by `bench backends`)")
        if dtype not in DTYPES:
            raise UsageError(f"--variants {item!r}: dtype must be one of {', '.join(DTYPES)}")
        if layout not in LAYOUTS:
            raise UsageError(f"--variants {item!r}: layout must be nhwc or nchw")
        if attention not in ATTENTION_KERNELS:
            raise UsageError(f"--variants {item!r}: attention must be one of {', '.join(ATTENTION_KERNELS)}")
        if dtype != "float32" and device.type != "cuda":
            raise UsageError(f"--variants {item!r}: {dtype} runs only on a GPU; use float32 variants on {device}")
        variants.append(Variant(backend, dtype, LAYOUTS[layout], attention))
    if not variants:
        raise UsageError("--variants is empty: name at least one, e.g. torch:float32")
    return list(dict.fromkeys(variants))


def default_variants(device: torch.device) -> list[Variant]:
    return parse_variants(",".join(GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS), device)


def sdpa_backends() -> dict:
    """The attention kernels torch's settings allow where a variant says `auto`."""
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def _release(device: torch.device) -> None:
    """Free the models of a finished part before the next part builds its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled graphs hold references to the modules they were made from


def _build(preset: str, device: torch.device, variant: Variant, seed: int, model: str | None):
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_mask_stage, build_sampler

    config = load_preset(preset, {"seed": seed, "diffusion": {"dtype": variant.dtype, "model": model}})
    sampler = build_sampler(config, str(device), variant.backend, channels_last=variant.channels_last,
                            attention=variant.attention)
    return config, sampler, build_mask_stage(config, sampler)


def _measure_variant(preset: str, device: torch.device, variant: Variant, records: Sequence, seed: int,
                     batch_sizes: Sequence[int], encode_workers: int, warmup: int, reps: int,
                     fresh: Callable[[], Path], peak_tflops: float | None, model: str | None) -> dict:
    config, sampler, masks = _build(preset, device, variant, seed, model)
    flops = unet_flops_per_row(sampler)
    rows = 4 * max(batch_sizes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet = summarise(unet_step_times(sampler, rows, warmup, reps))
    tflops = rows * flops / unet["median_s"] / 1e12
    unet.update(rows=rows, rows_per_s=rows / unet["median_s"], tflops_per_s=tflops,
                fraction_of_peak=tflops / peak_tflops if peak_tflops else None,
                peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    by_batch = []
    for b in batch_sizes:
        timing = timed(lambda rep, b=b: engine_pipeline(config, sampler, masks, records, fresh(), b,
                                                        encode_workers), device, reps, warmup)
        by_batch.append({"batch_size": b, **timing, "pairs_per_s": len(records) / timing["median_s"]})
    return {**_describe(variant), "flops_per_row": flops, "unet": unet,
            "pipeline": by_batch, "best": max(by_batch, key=lambda r: r["pairs_per_s"])}


def _describe(variant: Variant) -> dict:
    return {"variant": variant.name, "backend": variant.backend, "dtype": variant.dtype,
            "channels_last": variant.channels_last, "attention": variant.attention}


def _measure_reference(preset: str, device: torch.device, records: Sequence, seed: int, warmup: int, reps: int,
                       fresh: Callable[[], Path], model: str | None) -> dict:
    from magicseg_engine.config import load_preset

    dtype = load_preset(preset).diffusion.dtype if device.type == "cuda" else "float32"
    # The reference ran eager torch on NCHW weights.
    variant = Variant("torch", dtype, channels_last=False)
    config, sampler, masks = _build(preset, device, variant, seed, model)
    detector = reference_detector(config, device)
    timing = timed(lambda rep: reference_pipeline(sampler, detector, masks.annotator.refiner, records,
                                                  fresh().with_suffix(".tar")), device, reps, warmup)
    return {"variant": variant.name, **timing, "pairs": len(records), "pairs_per_s": len(records) / timing["median_s"]}


def bench_tune(preset: str, device: torch.device, variants: Sequence[Variant], records: Sequence,
               reference_records: Sequence, batch_sizes: Sequence[int] = (4, 8, 16), encode_workers: int = 4,
               warmup: int = 1, reps: int = 3, seed: int = 0,
               on_step: Callable[[str], None] | None = None, model: str | None = None) -> dict:
    """Every variant at every batch size, and the reference once; see the module docstring.

    `model` is the diffusers folder or hub id of presets that load one (sd15, sd21, sdxl).

    `records` are the pairs each engine repetition renders, `reference_records` those of the
    reference (a few are enough: it is timed per pair). `on_step(label)` follows each part.
    """
    batch_sizes = sorted({min(b, len(records)) for b in batch_sizes})
    peak = dense_peak_tflops(device)
    measured = []
    with tempfile.TemporaryDirectory(prefix="magicseg-bench-tune-") as tmp:
        runs = (Path(tmp) / f"run-{i}" for i in itertools.count())  # every repetition writes a new run
        fresh = lambda: next(runs)  # noqa: E731
        # Each part's models are dropped when its function returns, then freed before the next
        # part builds its own, so every peak belongs to one part.
        reference = _measure_reference(preset, device, reference_records, seed, warmup, reps, fresh, model)
        _release(device)
        if on_step:
            on_step("reference")
        for variant in variants:
            try:
                measured.append(_measure_variant(preset, device, variant, records, seed, batch_sizes,
                                                 encode_workers, warmup, reps, fresh, peak, model))
            except Exception as err:  # one variant's failure must not cost the rest of a long sweep
                first_line = (str(err).strip().splitlines() or [""])[0]
                log.warning("variant %s failed: %s: %s", variant.name, type(err).__name__, first_line)
                measured.append({**_describe(variant), "error": f"{type(err).__name__}: {first_line}"})
            _release(device)
            if on_step:
                on_step(variant.name)
    ran = [v for v in measured if "error" not in v]
    if not ran:
        raise UsageError("every variant failed: " + "; ".join(f"{v['variant']}: {v['error']}" for v in measured))
    best_variant = max(ran, key=lambda v: v["best"]["pairs_per_s"])
    chosen = next(v for v in variants if v.name == best_variant["variant"])
    best = {"variant": best_variant["variant"], **best_variant["best"],
            "generate_flags": chosen.generate_flags(best_variant["best"]["batch_size"])}
    fastest_unet = max(ran, key=lambda v: v["unet"]["tflops_per_s"])
    speedup = best["pairs_per_s"] / reference["pairs_per_s"]
    fraction = fastest_unet["unet"]["fraction_of_peak"]
    return {
        "benchmark": "tune",
        **environment(device),
        "preset": preset,
        "model": model,
        "settings": {"pairs": len(records), "reference_pairs": len(reference_records), "batch_sizes": batch_sizes,
                     "encode_workers": encode_workers, "warmup": warmup, "reps": reps, "seed": seed},
        "sdpa": sdpa_backends(),
        "dense_peak_tflops": peak,
        "reference": reference,
        "variants": measured,
        "best": best,
        "speedup": speedup,
        "unet_best": {"variant": fastest_unet["variant"], **fastest_unet["unet"]},
        "aims": {
            "end_to_end_speedup": {"target": AIM_END_TO_END_SPEEDUP, "measured": speedup,
                                   "met": speedup >= AIM_END_TO_END_SPEEDUP},
            "unet_fraction_of_peak": {"target": AIM_UNET_FRACTION_OF_PEAK, "measured": fraction,
                                      "met": None if fraction is None else fraction >= AIM_UNET_FRACTION_OF_PEAK},
        },
    }
