"""Pretraining throughput: the torch loader against DALI over the same shards, and a training step
with the fused Triton losses against the eager torch losses, measured in one run.

The loaders read a synthetic run written for the benchmark (coloured shapes, the generate
sample format). The fused losses run only on a GPU: on a CPU Triton would run interpreted,
which measures the interpreter, so there the step is timed with the eager losses alone.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from magicseg_engine.bench.common import environment, summarise, sync, time_calls


def _epoch_images_per_s(loader) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(batch["key"]) for batch in loader)
    return n / (time.perf_counter() - t0), n


def bench_loaders(run: Path, batch_size: int, size: int, workers: int, device: torch.device) -> dict:
    from magicseg_engine.train.data import PairLoader

    result: dict = {}
    torch_loader = PairLoader(run, batch_size, size, num_workers=workers)
    _epoch_images_per_s(torch_loader)  # warm: page cache, worker start-up
    result["torch"] = dict(zip(("images_per_s", "images"), _epoch_images_per_s(torch_loader)), workers=workers)
    try:
        from magicseg_engine.train.dali_loader import DaliPairLoader

        dali = DaliPairLoader(run, batch_size, size, device_id=device.index if device.type == "cuda" else None,
                              num_threads=max(1, workers))
    except ImportError as err:
        result["dali"] = {"skipped": str(err)}
        return result
    _epoch_images_per_s(dali)
    result["dali"] = dict(zip(("images_per_s", "images"), _epoch_images_per_s(dali)),
                          decode="mixed (GPU)" if device.type == "cuda" else "cpu")
    result["dali_speedup"] = result["dali"]["images_per_s"] / result["torch"]["images_per_s"]
    return result


def bench_step(preset: str, run: Path, device: torch.device, fused: bool, warmup: int, reps: int) -> dict:
    """Median seconds and peak memory of one optimiser step (forward, losses, backward, AdamW)."""
    from magicseg_engine.train.data import PairLoader
    from magicseg_engine.train.loop import load_pretrain_preset
    from magicseg_engine.train.model import MagicSegModel, TextEmbeddingBank, param_groups
    from magicseg_engine.train.objective import pretraining_losses, remap_labels, sample_candidates

    import numpy as np

    config = load_pretrain_preset(preset)
    torch.manual_seed(0)
    model = MagicSegModel(config.model).to(device)
    loader = PairLoader(run, config.batch_size, config.model.image_size, num_workers=0)
    batch = next(iter(loader))
    vocab = list(loader.index.classes)
    text = TextEmbeddingBank(model).lookup(vocab).to(device)
    index = {n: i for i, n in enumerate(vocab)}
    candidates = sample_candidates(batch["classes"], index, config.candidates, np.random.default_rng(0))
    labels = remap_labels(batch["mask"], batch["classes"], candidates, index).to(device)
    images, twins, classes = batch["image"].to(device), batch["twin"].to(device), text[candidates.to(device)]
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    def step() -> None:
        with autocast:
            outputs = model(images, classes, twins=twins)
        pretraining_losses(outputs, labels, config.weights, stride=config.loss_stride, use_triton=fused)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = summarise(time_calls(step, device, warmup, reps))
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**timing, "images_per_s": config.batch_size / timing["median_s"], "peak_memory_bytes": peak,
            "batch_size": config.batch_size, "precision": config.precision}


@contextmanager
def synthetic_run(preset: str, samples: int) -> Iterator[tuple[Path, int]]:
    """A temporary coloured-shapes run at the preset's crop size: (run folder, crop size)."""
    from magicseg_engine.train.loop import load_pretrain_preset
    from magicseg_engine.train.synthetic import write_synthetic_run

    size = load_pretrain_preset(preset).model.image_size
    with tempfile.TemporaryDirectory(prefix="magicseg-bench-pretrain-") as tmp:
        run = Path(tmp) / "run"
        write_synthetic_run(run, samples, size=size, seed=0)
        yield run, size


def bench_loader(preset: str, device: torch.device, samples: int = 128, workers: int = 2) -> dict:
    """Images/s of the torch loader and of DALI over the same shards."""
    from magicseg_engine.train.loop import load_pretrain_preset

    with synthetic_run(preset, samples) as (run, size):
        loaders = bench_loaders(run, load_pretrain_preset(preset).batch_size, size, workers, device)
    return {"benchmark": "loader", **environment(device), "preset": preset, "image_size": size,
            "samples": samples, "loaders": loaders}


def bench_train(preset: str, device: torch.device, samples: int = 32, warmup: int = 2, reps: int = 5) -> dict:
    """One optimiser step with the eager losses and, on a GPU, with the fused ones."""
    with synthetic_run(preset, samples) as (run, size):
        steps = {"eager": bench_step(preset, run, device, False, warmup, reps)}
        if device.type == "cuda":
            steps["fused"] = bench_step(preset, run, device, True, warmup, reps)
            steps["fused_speedup"] = steps["eager"]["median_s"] / steps["fused"]["median_s"]
        else:
            steps["fused"] = {"skipped": "the fused Triton losses are measured on a GPU; here they would run interpreted"}
            steps["fused_speedup"] = None
    return {"benchmark": "train", **environment(device), "preset": preset, "image_size": size,
            "warmup": warmup, "reps": reps, "step": steps}


def bench_pretrain(preset: str, device: torch.device, samples: int = 128, workers: int = 2,
                   warmup: int = 2, reps: int = 5) -> dict:
    """`bench_loader` and `bench_train` in one result."""
    loader = bench_loader(preset, device, samples, workers)
    train = bench_train(preset, device, samples, warmup, reps)
    return {"benchmark": "pretrain", **environment(device), "preset": preset, "image_size": loader["image_size"],
            "loaders": loader["loaders"], "step": train["step"]}
