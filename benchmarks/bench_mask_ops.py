"""Times magicseg-engine's C++ mask cleanup/merge ops against plain Python references.

    python benchmarks/bench_mask_ops.py [--n 64] [--size 512 512] [--classes 16]
                                        [--min-area 100] [--max-area 100]
                                        [--repeats 10] [--json OUT]

Every op runs on the same (N, H, W) uint8 batch of blob-shaped masks with sparse speckle
(isolated pixels outside the blobs, pinholes inside), the kind of output a segmenter gives
before cleanup. The C++ ops are timed on 1 thread and on all threads; the references are
scipy.ndimage.label per mask (components and holes), numpy (boxes, areas, and
ops.merge_label_map_reference for the merge) and, when installed, OpenCV's
connectedComponentsWithStats. merge_label_map merges the batch as N / classes images of
`classes` masks each. Outputs are checked equal before anything is timed. Results are printed
as a table; the JSON goes to --json OUT, or to stdout without it.
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
from scipy import ndimage

from magicseg_engine import ops

try:
    import cv2
except ImportError:  # OpenCV timings are optional
    cv2 = None

STRUCTURE = {8: np.ones((3, 3), bool), 4: ndimage.generate_binary_structure(2, 1)}


def blob_masks(n: int, h: int, w: int, seed: int, speckle: float = 0.002) -> np.ndarray:
    """Unions of a few random ragged ellipses, XOR a sparse speckle of single pixels."""
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
    masks ^= (rng.random(masks.shape) < speckle).astype(np.uint8)
    return masks


# --- references ------------------------------------------------------------------------


def scipy_remove_small_regions(masks: np.ndarray, min_area: int) -> np.ndarray:
    out = np.empty(masks.shape, np.uint8)
    for k, m in enumerate(masks):
        labels, n = ndimage.label(m, STRUCTURE[8])
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area
        keep[0] = False
        out[k] = keep[labels]
    return out


def scipy_fill_small_holes(masks: np.ndarray, max_area: int) -> np.ndarray:
    out = np.empty(masks.shape, np.uint8)
    for k, m in enumerate(masks):
        labels, n = ndimage.label(m == 0, STRUCTURE[4])  # holes of an 8-connected foreground
        fill = np.bincount(labels.ravel(), minlength=n + 1) <= max_area
        fill[0] = False
        fill[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
        out[k] = (m != 0) | fill[labels]
    return out


def opencv_remove_small_regions(masks: np.ndarray, min_area: int) -> np.ndarray:
    out = np.empty(masks.shape, np.uint8)
    for k, m in enumerate(masks):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_area
        keep[0] = False
        out[k] = keep[labels]
    return out


def opencv_fill_small_holes(masks: np.ndarray, max_area: int) -> np.ndarray:
    out = np.empty(masks.shape, np.uint8)
    for k, m in enumerate(masks):
        _, labels, stats, _ = cv2.connectedComponentsWithStats((m == 0).view(np.uint8), connectivity=4)
        fill = stats[:, cv2.CC_STAT_AREA] <= max_area
        fill[0] = False
        fill[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
        out[k] = (m != 0) | fill[labels]
    return out


def numpy_boxes(masks: np.ndarray) -> np.ndarray:
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    out = np.stack(
        [cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], 1
    ).astype(np.int32)
    out[~rows.any(1)] = -1
    return out


def numpy_areas(masks: np.ndarray) -> np.ndarray:
    return np.count_nonzero(masks, axis=(1, 2))


# --- timing ----------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
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
    parser.add_argument("--classes", type=int, default=16, help="masks per image for merge_label_map")
    parser.add_argument("--min-area", type=int, default=100)
    parser.add_argument("--max-area", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write results here instead of stdout")
    args = parser.parse_args()
    if args.n % args.classes:
        sys.exit(f"--n {args.n} is not a multiple of --classes {args.classes}")

    h, w = args.size
    masks = blob_masks(args.n, h, w, args.seed)
    images = args.n // args.classes
    merge_masks = masks.reshape(images, args.classes, h, w)
    rng = np.random.default_rng(args.seed)
    scores = rng.random((images, args.classes)).astype(np.float32)
    valid = rng.random((images, args.classes)) < 0.9
    all_threads = ops.build_info()["max_threads"]
    lo, hi = args.min_area, args.max_area

    # name -> (C++ call taking num_threads, {reference name: reference call})
    cases: dict[str, tuple[Callable[[int], np.ndarray], dict[str, Callable[[], np.ndarray]]]] = {
        "remove_small_regions": (
            lambda t: ops.remove_small_regions(masks, lo, num_threads=t),
            {"scipy": lambda: scipy_remove_small_regions(masks, lo)}
            | ({"opencv": lambda: opencv_remove_small_regions(masks, lo)} if cv2 else {}),
        ),
        "fill_small_holes": (
            lambda t: ops.fill_small_holes(masks, hi, num_threads=t),
            {"scipy": lambda: scipy_fill_small_holes(masks, hi)}
            | ({"opencv": lambda: opencv_fill_small_holes(masks, hi)} if cv2 else {}),
        ),
        "masks_to_boxes": (lambda t: ops.masks_to_boxes(masks, num_threads=t), {"numpy": lambda: numpy_boxes(masks)}),
        "mask_areas": (lambda t: ops.mask_areas(masks, num_threads=t), {"numpy": lambda: numpy_areas(masks)}),
        "merge_label_map_score": (
            lambda t: ops.merge_label_map(merge_masks, scores, valid, "score", num_threads=t),
            {"numpy": lambda: ops.merge_label_map_reference(merge_masks, scores, valid, "score")},
        ),
        "merge_label_map_smaller": (
            lambda t: ops.merge_label_map(merge_masks, scores, valid, "smaller", num_threads=t),
            {"numpy": lambda: ops.merge_label_map_reference(merge_masks, scores, valid, "smaller")},
        ),
    }

    # A benchmark of wrong output is worthless: check every op against its references first.
    for name, (ours, refs) in cases.items():
        got = ours(all_threads)
        if not np.array_equal(got, ours(1)):
            sys.exit(f"{name}: 1 thread and {all_threads} threads differ; not timing")
        for ref_name, ref in refs.items():
            if not np.array_equal(got, ref()):
                sys.exit(f"{name}: C++ differs from the {ref_name} reference; not timing")

    r = args.repeats
    t: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for name, (ours, refs) in cases.items():
        t[f"{name}_cpp_1_thread"] = median_seconds(lambda: ours(1), r)
        t[f"{name}_cpp_all_threads"] = median_seconds(lambda: ours(all_threads), r)
        ratios[f"{name}_thread_scaling"] = t[f"{name}_cpp_1_thread"] / t[f"{name}_cpp_all_threads"]
        for ref_name, ref in refs.items():
            t[f"{name}_{ref_name}"] = median_seconds(ref, r)
            for threads in ("1_thread", "all_threads"):
                ratios[f"{name}_speedup_{threads}_vs_{ref_name}"] = t[f"{name}_{ref_name}"] / t[f"{name}_cpp_{threads}"]

    cleaned = ops.remove_small_regions(masks, lo)
    filled = ops.fill_small_holes(masks, hi)
    result = {
        "batch": {
            "n": args.n,
            "h": h,
            "w": w,
            "foreground_fraction": float(masks.mean()),
            "min_area": lo,
            "max_area": hi,
            "pixels_removed_per_mask": float((masks.astype(np.int64) - cleaned).sum() / args.n),
            "pixels_filled_per_mask": float((filled.astype(np.int64) - masks).sum() / args.n),
            "merge_images": images,
            "merge_classes": args.classes,
        },
        "repeats": r,
        "median_seconds": t,
        "ratios": ratios,
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": version("scipy"),
            "opencv": cv2.__version__ if cv2 else None,
            "build_info": ops.build_info(),
        },
    }

    print(f"{args.n} masks of {h}x{w}, median of {r}, {all_threads} threads = all", file=sys.stderr)
    for name, sec in t.items():
        print(f"  {name:40s} {sec * 1e3:9.3f} ms", file=sys.stderr)
    for name, ratio in ratios.items():
        print(f"  {name:58s} {ratio:7.2f}x", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
