"""Latency and throughput of each exported component on every backend asked for, same inputs,
same run, at several batch sizes; eager torch is the baseline each is compared with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from magicseg_engine.bench.common import environment, summarise, time_calls
from magicseg_engine.engine.backends import OnnxRuntimeComponent, TensorRTComponent
from magicseg_engine.engine.build import load_components, load_engines
from magicseg_engine.engine.export import DIFFUSION_COMPONENTS, sample_inputs, torch_callable
from magicseg_engine.errors import UsageError

BENCH_BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")


def default_backends(device: torch.device) -> tuple[str, ...]:
    """torch and onnxruntime everywhere; compile, and TensorRT where it is installed, on a GPU."""
    if device.type != "cuda":
        return ("torch", "onnxruntime")
    from magicseg_engine.engine.tensorrt import tensorrt_status

    return ("torch", "compile", "onnxruntime") + (("tensorrt",) if tensorrt_status()[0] else ())


def _callables(backend: str, component: str, models, engines: Path, exported, device) -> Callable[..., object]:
    """A function of the export's inputs, by name, that runs `component` on `backend`."""
    if backend in ("torch", "compile"):
        net = torch_callable(component, models)
        if backend == "compile":
            net = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)
        names = exported.input_names
        return lambda **inputs: net(*(inputs[n] for n in names))
    if backend == "onnxruntime":
        return OnnxRuntimeComponent(exported, device)
    _, paths = load_engines(engines, models.model_id, [component])
    return TensorRTComponent(paths[component], cuda_graph=component == "unet")


def bench_backends(models, engines: Path, components: Sequence[str] = DIFFUSION_COMPONENTS,
                   batch_sizes: Sequence[int] = (1, 2, 4), warmup: int = 1, reps: int = 3,
                   backends: Sequence[str] | None = None) -> dict:
    device = next(models.unet.parameters()).device
    backends = tuple(backends or default_backends(device))
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or "torch" not in backends:
        raise UsageError(f"backends {', '.join(backends)}: choose from {', '.join(BENCH_BACKENDS)}, torch included "
                         "(it is the baseline)")
    if "tensorrt" in backends:
        from magicseg_engine.engine.tensorrt import require_tensorrt

        require_tensorrt()
    engines = Path(engines)
    exported = load_components(engines, models.model_id, components)
    rows = []
    for component in components:
        e = exported[component]
        run = {b: _callables(b, component, models, engines, e, device) for b in backends}
        # Spatial sizes are fixed at export (build-engines --size): the inputs take the file's.
        spatial = {"unet": "sample", "vae-decoder": "latents"}.get(component)
        latent_size = tuple(e.input_shapes[spatial][2:]) if spatial else None
        for batch in batch_sizes:
            inputs = {n: t.to(device) for n, t in sample_inputs(component, models, batch=batch,
                                                                 latent_size=latent_size).items()
                      if n in e.input_names}
            row: dict = {"component": component, "batch": batch}
            for backend, fn in run.items():
                with torch.inference_mode():
                    timing = summarise(time_calls(lambda: fn(**inputs), device, warmup, reps))
                row[backend] = {**timing, "items_per_s": batch / timing["median_s"]}
                if backend == "onnxruntime":
                    row[backend]["providers"] = fn.session.get_providers()
            for backend in backends:
                if backend != "torch":
                    row[f"{backend}_speedup"] = row["torch"]["median_s"] / row[backend]["median_s"]
            rows.append(row)
    return {"benchmark": "backends", **environment(device), "model": models.model_id, "backends": list(backends),
            "results": rows}
