"""Times magicseg-engine's C++ COCO RLE encode/decode against pycocotools on one mask batch.

    python benchmarks/bench_rle.py [--n 64] [--size 512 512] [--repeats 20] [--json OUT]

Both libraries get the same (N, H, W) uint8 batch of blob-shaped masks. pycocotools needs
a Fortran-ordered (H, W, N) array, so it is timed twice: on a prepared array, and with the
conversion from (N, H, W) included, which is what a caller holding (N, H, W) pays. Likewise
its decode is timed with and without turning its (H, W, N) output back into (N, H, W).
Results are printed as a table; the JSON goes to --json OUT, or to stdout without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
import pycocotools.mask as mask_utils

from magicseg_engine import ops


def blob_masks(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Unions of a few random ellipses with a ragged edge, like segmenter output."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.arctan2(yy - h / 2, xx - w / 2)
    masks = np.zeros((n, h, w), np.uint8)
    for m in masks:
        for _ in range(rng.integers(1, 6)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(h / 20, h / 3), rng.uniform(w / 20, w / 3)
            wobble = 1 + 0.15 * np.sin(rng.integers(3, 12) * angle + rng.uniform(0, 6.3))
            m |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble).astype(np.uint8)
    return masks


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="masks in the batch")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write results here instead of stdout")
    args = parser.parse_args()

    h, w = args.size
    masks = blob_masks(args.n, h, w, args.seed)
    all_threads = ops.build_info()["max_threads"]
    coco_input = np.asfortranarray(masks.transpose(1, 2, 0))
    coco_rles = mask_utils.encode(coco_input)
    ours = ops.rle_encode(masks, num_threads=all_threads)
    # A benchmark of wrong output is worthless: check identity before timing anything.
    if [r["counts"] for r in ours] != [r["counts"] for r in coco_rles]:
        sys.exit("C++ encode differs from pycocotools; not timing")
    if not np.array_equal(ops.rle_decode(coco_rles), masks):
        sys.exit("C++ decode differs from the input masks; not timing")

    r = args.repeats
    t = {
        "encode_cpp_1_thread": median_seconds(lambda: ops.rle_encode(masks, num_threads=1), r),
        "encode_cpp_all_threads": median_seconds(lambda: ops.rle_encode(masks, num_threads=all_threads), r),
        "encode_pycocotools_prepared": median_seconds(lambda: mask_utils.encode(coco_input), r),
        "encode_pycocotools_from_nhw": median_seconds(
            lambda: mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))), r
        ),
        "decode_cpp_1_thread": median_seconds(lambda: ops.rle_decode(ours, num_threads=1), r),
        "decode_cpp_all_threads": median_seconds(lambda: ops.rle_decode(ours, num_threads=all_threads), r),
        "decode_pycocotools_hwn": median_seconds(lambda: mask_utils.decode(coco_rles), r),
        "decode_pycocotools_to_nhw": median_seconds(
            lambda: np.ascontiguousarray(mask_utils.decode(coco_rles).transpose(2, 0, 1)), r
        ),
    }
    ratios = {
        "encode_speedup_1_thread_vs_pycocotools_prepared": t["encode_pycocotools_prepared"] / t["encode_cpp_1_thread"],
        "encode_speedup_1_thread_vs_pycocotools_from_nhw": t["encode_pycocotools_from_nhw"] / t["encode_cpp_1_thread"],
        "encode_speedup_all_threads_vs_pycocotools_from_nhw": t["encode_pycocotools_from_nhw"] / t["encode_cpp_all_threads"],
        "encode_thread_scaling": t["encode_cpp_1_thread"] / t["encode_cpp_all_threads"],
        "decode_speedup_1_thread_vs_pycocotools_hwn": t["decode_pycocotools_hwn"] / t["decode_cpp_1_thread"],
        "decode_speedup_1_thread_vs_pycocotools_to_nhw": t["decode_pycocotools_to_nhw"] / t["decode_cpp_1_thread"],
        "decode_speedup_all_threads_vs_pycocotools_to_nhw": t["decode_pycocotools_to_nhw"] / t["decode_cpp_all_threads"],
        "decode_thread_scaling": t["decode_cpp_1_thread"] / t["decode_cpp_all_threads"],
    }
    result = {
        "batch": {"n": args.n, "h": h, "w": w, "foreground_fraction": float(masks.mean()),
                  "mean_counts_bytes": float(np.mean([len(x["counts"]) for x in ours]))},
        "repeats": r,
        "median_seconds": t,
        "ratios": ratios,
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pycocotools": version("pycocotools"),
            "build_info": ops.build_info(),
        },
    }

    print(f"{args.n} masks of {h}x{w}, median of {r}, {all_threads} threads = all", file=sys.stderr)
    for name, sec in t.items():
        print(f"  {name:32s} {sec * 1e3:9.3f} ms", file=sys.stderr)
    for name, ratio in ratios.items():
        print(f"  {name:52s} {ratio:6.2f}x", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
