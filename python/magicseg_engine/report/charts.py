"""The report's statistics as PNG charts (matplotlib, no display needed).

Charts are drawn on `matplotlib.figure.Figure` objects rather than through pyplot, so no
global figure state or interactive backend is involved and nothing needs closing.
"""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from magicseg_engine.report.gather import AREA_BINS, QUALITY_BINS, RunDigest

MAX_BARS = 40  # classes in the samples-per-class chart; the table on the page lists them all
MAX_PANELS = 20  # classes with their own mask-area histogram
DPI = 100
PASS_COLOUR, FAIL_COLOUR, PLAIN_COLOUR = "#2e9e55", "#d1493f", "#4c72b0"


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def _png(fig: Figure) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def samples_per_class(digest: RunDigest, colours: dict) -> bytes:
    names = digest.class_names()[:MAX_BARS]
    counts = [digest.classes[n].samples for n in names]
    fig = Figure(figsize=(5.6, 0.8 + 0.22 * len(names)))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, counts, color=[_rgb(colours[n]) for n in names], edgecolor="#333", linewidth=0.4)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("samples showing the class")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    more = len(digest.classes) - len(names)
    ax.set_title("Samples per class" + (f" ({len(names)} most frequent; {more} more in the table)" if more else ""))
    for i, count in enumerate(counts):
        ax.text(count, i, f" {count}", va="center", fontsize=7)
    ax.margins(x=0.12)
    return _png(fig)


def classes_per_image(digest: RunDigest) -> bytes:
    counts = sorted(digest.classes_per_image.items())
    fig = Figure(figsize=(4.6, 2.8))
    ax = fig.subplots()
    ax.bar([k for k, _ in counts], [v for _, v in counts], color=PLAIN_COLOUR)
    ax.set_xticks([k for k, _ in counts])
    for k, v in counts:
        ax.text(k, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("classes in the image")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Classes per image")
    ax.margins(y=0.15)
    return _png(fig)


def mask_area_per_class(digest: RunDigest, colours: dict) -> bytes | None:
    """Histograms of each class's mask area (fraction of the image), one small panel per class."""
    names = [n for n in digest.class_names() if digest.classes[n].masks][:MAX_PANELS]
    if not names:
        return None
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(2.0 * columns, 1.55 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, squeeze=False)).ravel()
    width = AREA_BINS[1] - AREA_BINS[0]
    for ax, name in zip(axes, names):
        stats = digest.classes[name]
        ax.bar(AREA_BINS[:-1], stats.area_hist, width=width, align="edge", color=_rgb(colours[name]),
               edgecolor="#333", linewidth=0.3)
        ax.set_title(f"{name} ({stats.masks})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.set_xlim(0, 1)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    more = len([n for n in digest.classes if digest.classes[n].masks]) - len(names)
    fig.suptitle("Mask area per class (fraction of the image; masks per class in brackets)"
                 + (f", {len(names)} most frequent" if more > 0 else ""), fontsize=10)
    fig.supxlabel("mask area / image area", fontsize=8)
    return _png(fig)


def counterfactual_quality(digest: RunDigest) -> bytes | None:
    """Histogram of 1 - (largest share of a class mask the negative still shows), split at the
    pass threshold, so the failed part of the distribution is visible at once."""
    if not digest.quality_hist.any():
        return None
    fig = Figure(figsize=(4.6, 2.8))
    ax = fig.subplots()
    width = QUALITY_BINS[1] - QUALITY_BINS[0]
    threshold = digest.quality_threshold
    centres = QUALITY_BINS[:-1] + width / 2
    colour = [PLAIN_COLOUR if threshold is None else FAIL_COLOUR if c < threshold else PASS_COLOUR
              for c in centres]
    ax.bar(QUALITY_BINS[:-1], digest.quality_hist, width=width, align="edge", color=colour,
           edgecolor="#333", linewidth=0.3)
    ax.set_ylim(0, digest.quality_hist.max() * 1.25)  # headroom for the pass/fail labels
    if threshold is not None:
        ax.axvline(threshold, color="#222", linestyle="--", linewidth=1)
        top = ax.get_ylim()[1] * 0.97
        ax.text(threshold, top, "fail ← ", ha="right", va="top", fontsize=8, color=FAIL_COLOUR)
        ax.text(threshold, top, " → pass", ha="left", va="top", fontsize=8, color=PASS_COLOUR)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, 1)
    ax.set_xlabel("counterfactual quality (1 = the class is gone from the negative)")
    ax.set_ylabel("samples")
    ax.set_title("Counterfactual quality")
    return _png(fig)
