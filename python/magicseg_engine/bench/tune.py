"""The settings that decide throughput on a GPU or a CPU, swept end to end against the reference pipeline.

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
reference, and whether the two aims were met: 8x end to end, half the ceiling in the UNet.
A variant that fails (no kernel for that attention choice, out of memory, a compiler error)
is recorded with its error and the sweep goes on.

On the CPU the sweep adds what decides speed there: torch's intra-op thread count
(`torch.set_num_threads`: the physical cores this process may use, half of them, and 1 on
machines of up to four cores), bfloat16 where the CPU has AMX or AVX512-BF16 and `generate`
runs bfloat16 on it (otherwise those variants are left out, each with its reason, under
`skipped`), and the `onnxruntime` backend, whose UNet, VAE decoder, text encoder and SAM run
from ONNX exports made once per precision into the sweep's temporary folder, as
`build-engines` makes them.

Written as `VARIANT` strings, `backend:dtype[:layout[:attention]][@threads]`, e.g.
`compile:bfloat16:nhwc:flash` or `torch:float32:nhwc@4`. `@threads` sets torch's thread count
for that variant (absent: torch's own, one per physical core) and `generate --threads` repeats
it. Exported backends take no layout or attention (ONNX Runtime chooses both):
`onnxruntime:float32@4`; their sessions keep ONNX Runtime's own thread pool, so `@threads`
there sets only the torch work around them (mask extraction, SAM's prompt encoder), which
still competes with that pool for the cores.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from magicseg_engine.bench.common import dense_peak_tflops, environment, summarise, timed
from magicseg_engine.bench.generate import unet_step_times
from magicseg_engine.bench.pipeline import engine_pipeline, reference_detector, reference_pipeline
from magicseg_engine.bench.unet import unet_flops_per_row
from magicseg_engine.engine.backends import ATTENTION_KERNELS, EXPORTED_BACKENDS
from magicseg_engine.generate.models import CPU_BF16_FLAGS, cpu_supports_bf16
from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)

TUNED_BACKENDS = ("torch", "compile", "onnxruntime")
DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = {"nhwc": True, "nchw": False}
# The precision build-engines exports in for a variant's dtype.
EXPORT_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Where `bench tune` prints the engines folder of an exported backend in its advice: the
# sweep's own exports are temporary, so the user makes theirs with build-engines.
ENGINES_PLACEHOLDER = "ENGINES"
# The throughput aims: end to end against the reference pipeline, and the UNet against the
# device's dense FLOP ceiling. 8x end to end is what batching, shared noise, batched SAM and
# a UNet at half the ceiling add up to on an H100 by reading the code; the results page says
# how far each measured figure is from both.
AIM_END_TO_END_SPEEDUP = 8.0
AIM_UNET_FRACTION_OF_PEAK = 0.5

GPU_VARIANTS = ("torch:float16:nchw", "torch:float16:nhwc", "torch:bfloat16:nhwc", "torch:bfloat16:nhwc:math",
                "compile:bfloat16:nhwc")
# Each crossed with every thread count of `cpu_thread_counts`; the bfloat16 ones only where
# `cpu_bf16_skip_reason` finds nothing against them. onnxruntime too: its sessions keep their
# own pool, but fewer torch threads beside that pool can still be faster.
CPU_VARIANTS = ("torch:float32:nchw", "torch:float32:nhwc", "torch:float32:nchw:math")
CPU_BF16_VARIANTS = ("torch:bfloat16:nchw", "torch:bfloat16:nhwc")
CPU_EXPORTED_VARIANTS = ("onnxruntime:float32",)


@dataclass(frozen=True)
class Variant:
    backend: str
    dtype: str
    channels_last: bool
    attention: str = "auto"
    threads: int | None = None  # torch.set_num_threads for the variant; None: torch's own

    @property
    def exported(self) -> bool:
        return self.backend in EXPORTED_BACKENDS

    @property
    def name(self) -> str:
        if self.exported:
            name = f"{self.backend}:{self.dtype}"
        else:
            name = f"{self.backend}:{self.dtype}:{'nhwc' if self.channels_last else 'nchw'}"
            name = name if self.attention == "auto" else f"{name}:{self.attention}"
        return name if self.threads is None else f"{name}@{self.threads}"

    def generate_flags(self, batch_size: int) -> str:
        """The `magicseg-engine generate` options that run this variant at `batch_size`; an
        exported backend names its folder ENGINES (see `build_engines_command`)."""
        if self.exported:
            flags = f"--backend {self.backend} --engines {ENGINES_PLACEHOLDER} --dtype {self.dtype}"
        else:
            layout = "--channels-last" if self.channels_last else "--no-channels-last"
            flags = f"--backend {self.backend} --dtype {self.dtype} {layout} --attention {self.attention}"
        if self.threads is not None:
            flags += f" --threads {self.threads}"
        return f"{flags} --batch-size {batch_size}"

    def build_engines_command(self, preset: str, device: torch.device, model: str | None) -> str | None:
        """The build-engines call that makes the ENGINES folder of `generate_flags`, if it needs one."""
        if not self.exported:
            return None
        return (f"magicseg-engine build-engines --preset {preset}" + (f" --model {model}" if model else "")
                + f" --precision {EXPORT_PRECISION[self.dtype]} --device {device.type} --out {ENGINES_PLACEHOLDER}")


def cpu_bf16_skip_reason() -> str | None:
    """Why bfloat16 variants cannot be measured on this CPU, or None when they can."""
    from magicseg_engine.generate.models import resolve_dtype

    if not cpu_supports_bf16():
        return (f"this CPU has neither {' nor '.join(CPU_BF16_FLAGS)} among its flags, so bfloat16 is emulated "
                "and slower than float32")
    # `generate` must run what the sweep advises: a dtype it would quietly run as float32 is
    # not a variant of its own. resolve_dtype warns when it does that; the probe stays quiet.
    models_log = logging.getLogger("magicseg_engine.generate.models")
    level = models_log.level
    models_log.setLevel(logging.ERROR)
    try:
        resolved = resolve_dtype("bfloat16", torch.device("cpu"))
    finally:
        models_log.setLevel(level)
    if resolved is not torch.bfloat16:
        return f"generate runs bfloat16 as {str(resolved).removeprefix('torch.')} on the CPU"
    return None


def physical_cores() -> int:
    """The physical cores this process may run on: psutil's count, capped by the CPU affinity
    (a container or taskset may allow fewer than the machine has)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    physical = physical or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on macOS and Windows
        allowed = physical
    return max(1, min(physical, allowed))


def cpu_thread_counts(cores: int | None = None) -> list[int]:
    """The thread counts the CPU sweep tries, most first: every physical core (torch's default),
    half of them (hybrid laptop CPUs and the JPEG and mask threads beside torch's can make that
    faster), and a single thread on machines of up to four cores, where it costs little."""
    cores = cores or physical_cores()
    counts = {cores, max(1, cores // 2)}
    if cores <= 4:
        counts.add(1)
    return sorted(counts, reverse=True)


def parse_variants(text: str, device: torch.device) -> list[Variant]:
    """`backend:dtype[:layout[:attention]][@threads]` items separated by commas; a missing layout
    is NHWC on a GPU, NCHW on the CPU (what `generate` uses there); a missing attention is
    `auto`; a missing thread count leaves torch's. Exported backends take `backend:dtype[@threads]`."""
    variants = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        spec, at, threads_text = item.partition("@")
        threads = None
        if at:
            try:
                threads = int(threads_text)
            except ValueError:
                threads = 0
            if threads <= 0:
                raise UsageError(f"--variants {item!r}: @threads must be a positive whole number, e.g. "
                                 "torch:float32:nhwc@4")
        fields = spec.split(":")
        if len(fields) not in (2, 3, 4):
            raise UsageError(f"--variants {item!r}: write backend:dtype[:layout[:attention]][@threads], "
                             "e.g. compile:bfloat16:nhwc")
        backend, dtype = fields[0], fields[1]
        if backend not in TUNED_BACKENDS:
            raise UsageError(f"--variants {item!r}: backend must be one of {', '.join(TUNED_BACKENDS)} "
                             "(TensorRT engines are measured by `bench backends`)")
        exported = backend in EXPORTED_BACKENDS
        if exported and len(fields) > 2:
            raise UsageError(f"--variants {item!r}: {backend} runs the exported graphs, whose layout and attention "
                             f"are its own; write {backend}:dtype[@threads]")
        layout = fields[2] if len(fields) >= 3 else ("nhwc" if device.type == "cuda" and not exported else "nchw")
        attention = fields[3] if len(fields) == 4 else "auto"
        if dtype not in DTYPES:
            raise UsageError(f"--variants {item!r}: dtype must be one of {', '.join(DTYPES)}")
        if layout not in LAYOUTS:
            raise UsageError(f"--variants {item!r}: layout must be nhwc or nchw")
        if attention not in ATTENTION_KERNELS:
            raise UsageError(f"--variants {item!r}: attention must be one of {', '.join(ATTENTION_KERNELS)}")
        if device.type != "cuda" and dtype != "float32":
            if dtype == "float16" or exported:
                what = "exported in half precision" if exported else dtype
                raise UsageError(f"--variants {item!r}: {what} runs only on a GPU; use float32 variants on {device}")
            reason = cpu_bf16_skip_reason()
            if reason:
                raise UsageError(f"--variants {item!r}: {reason}; use float32 variants on {device}")
        variants.append(Variant(backend, dtype, LAYOUTS[layout], attention, threads))
    if not variants:
        raise UsageError("--variants is empty: name at least one, e.g. torch:float32")
    return list(dict.fromkeys(variants))


def _cpu_variant_texts() -> tuple[list[str], list[dict]]:
    """The CPU sweep's variant strings, and the bfloat16 ones left out with their reason."""
    counts = cpu_thread_counts()
    bf16_reason = cpu_bf16_skip_reason()
    bases = list(CPU_VARIANTS) + ([] if bf16_reason else list(CPU_BF16_VARIANTS)) + list(CPU_EXPORTED_VARIANTS)
    texts = [f"{base}@{n}" for n in counts for base in bases]
    skipped = [] if not bf16_reason else [{"variant": f"{base}@{n}", "reason": bf16_reason}
                                          for n in counts for base in CPU_BF16_VARIANTS]
    return texts, skipped


def default_variants(device: torch.device) -> list[Variant]:
    if device.type == "cuda":
        return parse_variants(",".join(GPU_VARIANTS), device)
    return parse_variants(",".join(_cpu_variant_texts()[0]), device)


def skipped_variants(device: torch.device) -> list[dict]:
    """The variants the default sweep leaves out on `device`, each with the reason."""
    return [] if device.type == "cuda" else _cpu_variant_texts()[1]


def sdpa_backends() -> dict:
    """The attention kernels torch's settings allow where a variant says `auto`."""
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _release(device: torch.device) -> None:
    """Free the models of a finished part before the next part builds its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled graphs hold references to the modules they were made from


def _build(preset: str, device: torch.device, variant: Variant, seed: int, model: str | None,
           engines: Path | None = None):
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_mask_stage, build_sampler

    config = load_preset(preset, {"weights_seed": seed, "diffusion": {"dtype": variant.dtype, "model": model}})
    sampler = build_sampler(config, str(device), variant.backend, engines, channels_last=variant.channels_last,
                            attention=variant.attention)
    return config, sampler, build_mask_stage(config, sampler, engines)


def _export(preset: str, device: torch.device, dtype: str, seed: int, model: str | None, out: Path) -> dict:
    """What `build-engines --format onnx` writes for the run's settings: the diffusion models,
    unet-capture when masks read attention, SAM when it refines them; returns its timing."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.engine.build import build_engines
    from magicseg_engine.engine.export import CAPTURE_COMPONENT, DIFFUSION_COMPONENTS, SAM_COMPONENTS

    config = load_preset(preset, {"weights_seed": seed, "diffusion": {"dtype": dtype, "model": model}})
    components = (DIFFUSION_COMPONENTS + ((CAPTURE_COMPONENT,) if config.masks.source != "none" else ())
                  + (SAM_COMPONENTS if config.masks.refine_with_sam else ()))
    t0 = time.perf_counter()
    # The batch sizes size only TensorRT profiles; ONNX exports take any batch.
    build_engines(config, out, fmt="onnx", precision=EXPORT_PRECISION[dtype], batch_sizes=(1,),
                  components=components, device=str(device))
    return {"precision": EXPORT_PRECISION[dtype], "components": list(components),
            "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count held at `threads` (None: left as it is) inside the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_variant(preset: str, device: torch.device, variant: Variant, records: Sequence, seed: int,
                     batch_sizes: Sequence[int], encode_workers: int, warmup: int, reps: int,
                     fresh: Callable[[], Path], peak_tflops: float | None, model: str | None,
                     engines: Path | None = None) -> dict:
    config, sampler, masks = _build(preset, device, variant, seed, model, engines)
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
    return {**_describe(variant), "threads": torch.get_num_threads(), "flops_per_row": flops, "unet": unet,
            "pipeline": by_batch, "best": max(by_batch, key=lambda r: r["pairs_per_s"])}


def _describe(variant: Variant) -> dict:
    return {"variant": variant.name, "backend": variant.backend, "dtype": variant.dtype,
            "channels_last": variant.channels_last, "attention": variant.attention, "threads": variant.threads}


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
    return {"variant": variant.name, **timing, "pairs": len(records), "pairs_per_s": len(records) / timing["median_s"],
            "threads": torch.get_num_threads()}


def bench_tune(preset: str, device: torch.device, variants: Sequence[Variant], records: Sequence,
               reference_records: Sequence, batch_sizes: Sequence[int] = (4, 8, 16), encode_workers: int = 4,
               warmup: int = 1, reps: int = 3, seed: int = 0,
               on_step: Callable[[str], None] | None = None, model: str | None = None,
               skipped: Sequence[dict] = ()) -> dict:
    """Every variant at every batch size, and the reference once; see the module docstring.

    `model` is the diffusers folder or hub id of presets that load one (sd15, sd21, sdxl).

    `records` are the pairs each engine repetition renders, `reference_records` those of the
    reference (a few are enough: it is timed per pair). `on_step(label)` follows each part.
    `skipped` are the variants left out before the sweep (`skipped_variants`), recorded as given.
    """
    batch_sizes = sorted({min(b, len(records)) for b in batch_sizes})
    peak = dense_peak_tflops(device)
    measured, exports = [], {}
    with tempfile.TemporaryDirectory(prefix="magicseg-bench-tune-") as tmp:
        runs = (Path(tmp) / f"run-{i}" for i in itertools.count())  # every repetition writes a new run
        fresh = lambda: next(runs)  # noqa: E731

        def engines_for(variant: Variant) -> Path:
            """The exports an exported variant runs, made once per precision for the whole sweep."""
            precision = EXPORT_PRECISION[variant.dtype]
            folder = Path(tmp) / f"engines-{precision}"
            if precision not in exports:
                try:
                    exports[precision] = _export(preset, device, variant.dtype, seed, model, folder)
                except Exception as err:  # recorded, so the next variant of this precision is not exported again
                    exports[precision] = {"error": f"{type(err).__name__}: {_first_line(err)}"}
                    raise
                finally:
                    _release(device)
            if "error" in exports[precision]:
                raise RuntimeError(f"the {precision} export failed: {exports[precision]['error']}")
            return folder

        # Each part's models are dropped when its function returns, then freed before the next
        # part builds its own, so every peak belongs to one part. The reference runs with
        # torch's own thread count, as the reference code did.
        reference = _measure_reference(preset, device, reference_records, seed, warmup, reps, fresh, model)
        _release(device)
        if on_step:
            on_step("reference")
        for variant in variants:
            try:
                engines = engines_for(variant) if variant.exported else None
                with torch_threads(variant.threads):
                    measured.append(_measure_variant(preset, device, variant, records, seed, batch_sizes,
                                                     encode_workers, warmup, reps, fresh, peak, model,
                                                     engines=engines))
            except Exception as err:  # one variant's failure must not cost the rest of a long sweep
                log.warning("variant %s failed: %s: %s", variant.name, type(err).__name__, _first_line(err))
                measured.append({**_describe(variant), "error": f"{type(err).__name__}: {_first_line(err)}"})
            _release(device)
            if on_step:
                on_step(variant.name)
    ran = [v for v in measured if "error" not in v]
    if not ran:
        raise UsageError("every variant failed: " + "; ".join(f"{v['variant']}: {v['error']}" for v in measured))
    best_variant = max(ran, key=lambda v: v["best"]["pairs_per_s"])
    chosen = next(v for v in variants if v.name == best_variant["variant"])
    best = {"variant": best_variant["variant"], **best_variant["best"],
            "generate_flags": chosen.generate_flags(best_variant["best"]["batch_size"]),
            "build_engines": chosen.build_engines_command(preset, device, model)}
    fastest_unet = max(ran, key=lambda v: v["unet"]["tflops_per_s"])
    speedup = best["pairs_per_s"] / reference["pairs_per_s"]
    fraction = fastest_unet["unet"]["fraction_of_peak"]
    result = {
        "benchmark": "tune",
        **environment(device),
        "preset": preset,
        "model": model,
        "settings": {"pairs": len(records), "reference_pairs": len(reference_records), "batch_sizes": batch_sizes,
                     "encode_workers": encode_workers, "warmup": warmup, "reps": reps, "weights_seed": seed},
        "sdpa": sdpa_backends(),
        "dense_peak_tflops": peak,
        "reference": reference,
        "variants": measured,
        "skipped": list(skipped),
        "exports": exports,
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
    if device.type != "cuda":
        result["cpu"] = {"physical_cores": physical_cores(), "thread_counts": cpu_thread_counts(),
                         "bf16_instructions": cpu_supports_bf16(), "bfloat16_skip_reason": cpu_bf16_skip_reason()}
    return result
