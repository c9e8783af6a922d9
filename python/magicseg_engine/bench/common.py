"""What every benchmark records: the machine, the versions, and robust timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from magicseg_engine.config import library_versions

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name(). Used only to report a fraction of the ceiling.
DENSE_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                     "A100": 312.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0}


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def dense_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DENSE_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Wall seconds of `reps` calls after `warmup` untimed ones, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timed(fn, device: torch.device, reps: int, warmup: int) -> dict:
    """`fn(rep)` timed `reps` times after `warmup` calls, with the peak device memory of the last."""
    times, peaks = [], []
    for rep in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        fn(rep)
        sync(device)
        if rep >= warmup:
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return {**summarise(times), "peak_memory_bytes": peaks[-1]}


def summarise(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0, "reps": len(times)}


def environment(device: torch.device) -> dict:
    return {"machine": device_info(device), "versions": library_versions()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` by torch's flop counter, attention held to SDPA's math kernel: the counter
    has no formula for the CPU's fused attention kernel (it counted no attention there), and the
    math kernel does the same two matmuls as the fused kernels it stands in for."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def bench_vocabulary(config):
    """The classes a benchmark draws its prompts from: the shapes world's for world prompts (the
    shapes preset, whose prompts name only its colours and shapes), VOC's otherwise."""
    from magicseg_engine.vocab import load_vocabulary

    return load_vocabulary("shapes" if config.prompts.source == "world" else "voc")
