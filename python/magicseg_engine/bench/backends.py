"""Latency and throughput of each exported component: torch against onnxruntime, same inputs,
same run, at several batch sizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from magicseg_engine.bench.common import environment, summarise, time_calls
from magicseg_engine.engine.build import load_components, to_numpy_inputs
from magicseg_engine.engine.export import DIFFUSION_COMPONENTS, onnxruntime_session, sample_inputs, torch_callable


def bench_backends(models, engines: Path, components: Sequence[str] = DIFFUSION_COMPONENTS,
                   batch_sizes: Sequence[int] = (1, 2, 4), warmup: int = 1, reps: int = 3) -> dict:
    device = next(models.unet.parameters()).device
    exported = load_components(Path(engines), models.model_id, components)
    rows = []
    for component in components:
        e = exported[component]
        session = onnxruntime_session(e)
        reference = torch_callable(component, models)
        for batch in batch_sizes:
            inputs = sample_inputs(component, models, batch=batch)
            args = [inputs[n].to(device) for n in e.input_names]
            feeds = to_numpy_inputs({n: inputs[n] for n in e.input_names})
            with torch.inference_mode():
                eager = summarise(time_calls(lambda: reference(*args), device, warmup, reps))
            ort = summarise(time_calls(lambda: session.run(None, feeds), device, warmup, reps))
            rows.append({
                "component": component, "batch": batch,
                "torch": {**eager, "items_per_s": batch / eager["median_s"]},
                "onnxruntime": {**ort, "items_per_s": batch / ort["median_s"],
                                "providers": session.get_providers()},
                "onnxruntime_speedup": eager["median_s"] / ort["median_s"],
            })
    return {"benchmark": "backends", **environment(device), "model": models.model_id, "results": rows}
