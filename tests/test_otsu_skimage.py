"""The mask code's Otsu threshold against scikit-image's `threshold_otsu`, the usual reference,
and against Otsu's rule evaluated in exact rational arithmetic.

Both codes take the centre of the last bin of the lower class at the first maximum of the
between-class variance w1 w2 (m1 - m2)^2. scikit-image accumulates the counts in float32, so
where two splits' variances differ by less than float32 resolution (relative 1e-6 or so) it
may pick either; the mask code accumulates in float64. So each case checks: the mask code's
threshold is the exact first maximum (Fractions over the same histogram, no shared code), and
scikit-image's is the same bin, or a bin whose exact variance is within 1e-6 of the maximum's.
The threshold itself is a bin centre: compared to 1e-12 of the range in float64, and to 1e-6
(float32 rounding) where the mask code hands it back as float32.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicseg_engine.kernels.mask_extract import HIST_BINS, extract_masks_reference, otsu_from_histogram, otsu_threshold

skimage_filters = pytest.importorskip("skimage.filters", reason="scikit-image is in the [dev] extra")
threshold_otsu = skimage_filters.threshold_otsu


def exact_variances(counts: np.ndarray, lo: float, hi: float) -> list[Fraction]:
    """Between-class variance of every split (lower class = bins 0..k), in exact arithmetic."""
    n = len(counts)
    c = [int(v) for v in counts]
    centres = [Fraction(lo) + (Fraction(hi) - Fraction(lo)) * (2 * i + 1) / (2 * n) for i in range(n)]
    total_w, total_s = sum(c), sum(ci * x for ci, x in zip(c, centres))
    w1, s1, out = 0, Fraction(0), []
    for k in range(n - 1):
        w1 += c[k]
        s1 += c[k] * centres[k]
        w2 = total_w - w1
        out.append(Fraction(0) if w1 == 0 or w2 == 0 else w1 * w2 * (s1 / w1 - (total_s - s1) / w2) ** 2)
    return out


def check_against_exact_and_skimage(got: float, reference: float, counts: np.ndarray, lo: float, hi: float,
                                    tol: float) -> None:
    variances = exact_variances(counts, lo, hi)
    best = max(variances)
    first = variances.index(best)
    centres = _centres(lo, hi, len(counts))
    assert got == pytest.approx(centres[first], abs=tol), "not the exact first maximum"
    k = int(np.argmin(np.abs(centres - reference)))
    assert reference == pytest.approx(centres[k], abs=1e-12 * (hi - lo))
    assert k == first or best - variances[k] <= Fraction(1, 10**6) * best, (k, first)


def _centres(lo: float, hi: float, bins: int) -> np.ndarray:
    edges = np.linspace(lo, hi, bins + 1)
    return (edges[:-1] + edges[1:]) / 2


def _histograms() -> dict[str, np.ndarray]:
    """Counts over 256 bins. scikit-image's histogram route needs the first and last bins
    occupied (an empty end bin makes its class mean 0/0), as an image's own [min, max] range
    always has them; every histogram here keeps one count at each end."""
    x = np.arange(HIST_BINS)
    shapes = {
        # Two peaks of different heights and widths.
        "bimodal": 900 * np.exp(-0.5 * ((x - 60) / 12) ** 2) + 400 * np.exp(-0.5 * ((x - 190) / 20) ** 2),
        # Most mass at the low end, a long tail to the right (a small object on a large background).
        "skewed": 5000 * np.exp(-x / 18.0),
        # Flat: every bin the same; the best split is the middle.
        "flat": np.full(HIST_BINS, 7.0),
        # Narrow peaks with nothing between them: every split between them ties, the first wins.
        "tied": np.where((x < 3) | (x > 250), 50.0, 0.0),
    }
    out = {}
    for name, h in shapes.items():
        h = np.floor(h)
        h[0], h[-1] = max(h[0], 1), max(h[-1], 1)
        out[name] = h
    return out


@pytest.mark.parametrize("name", list(_histograms()))
@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-3.5, 12.25)])
def test_same_histogram_same_threshold(name, lo, hi):
    counts = _histograms()[name]
    centres = _centres(lo, hi, HIST_BINS)
    expected = float(threshold_otsu(hist=(counts, centres)))
    got = otsu_from_histogram(torch.from_numpy(counts), lo, hi).item()
    check_against_exact_and_skimage(got, expected, counts, lo, hi, tol=1e-6 * (hi - lo))
    if name == "flat":
        # Splitting a flat histogram at k gives k (256 - k) 128^2 bin widths^2: largest at
        # k = 128, the first 128 bins below, so the threshold is bin 127's centre.
        assert expected == pytest.approx(centres[127], abs=1e-12)
    if name == "tied":
        # Every split with the empty bins 3..250 on either side separates the same two peaks:
        # the first such split, after bin 2, is what both return.
        assert expected == pytest.approx(centres[2], abs=1e-12)


@pytest.mark.parametrize("kind", ["bimodal", "skewed", "flat"])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_values_same_threshold(kind, seed):
    """From raw values: both histogram over the values' own [min, max] in 256 bins."""
    rng = np.random.default_rng(seed)
    if kind == "bimodal":
        values = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.1, 1200)])
    elif kind == "skewed":
        values = rng.lognormal(0.0, 0.9, 5000)
    else:
        values = rng.uniform(-1.0, 3.0, 5000)
    expected = float(threshold_otsu(values, nbins=HIST_BINS))
    got = otsu_threshold(torch.from_numpy(values)).item()
    lo, hi = float(values.min()), float(values.max())
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(lo, hi))  # the bins both codes use
    check_against_exact_and_skimage(got, expected, counts, lo, hi, tol=1e-6 * (hi - lo))
    # A sanity check of the reference itself on the bimodal case: between the two modes.
    if kind == "bimodal":
        assert 0.3 < expected < 0.6


def test_constant_values_give_their_own_value():
    values = np.full(100, 0.375)
    assert threshold_otsu(values) == 0.375
    assert otsu_threshold(torch.from_numpy(values)).item() == 0.375


def _blob_maps(seed: int) -> torch.Tensor:
    """[1, 3, 8, 8] attention-like maps: one or two blobs and noise, with the minimum pinned
    to the top-left cell and the maximum to the bottom-right one. At the image's corners the
    upsampling repeats the corner cells, so the upsampled values span exactly [0, 1] after
    normalisation, and scikit-image's own [min, max] range is the mask code's fixed [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:8, 0:8]
    maps = []
    for c in range(3):
        m = rng.uniform(0, 0.2, (8, 8))
        for _ in range(1 + c % 2):
            cy, cx, s = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0.8, 2.0)
            m += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        m[0, 0] = m.min() - 0.1
        m[7, 7] = m.max() + 0.1
        maps.append(m * rng.uniform(0.01, 50))  # attention maps have any scale
    return torch.tensor(np.stack(maps)[None], dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_thresholds_equal_skimage_on_the_upsampled_maps(seed):
    """What the masks use: Otsu over each map normalised to [0, 1] and upsampled to the image."""
    maps = _blob_maps(seed)
    size = (48, 40)
    result = extract_masks_reference(maps, torch.ones(1, 3, dtype=torch.bool), size, threshold="otsu")
    for c in range(maps.shape[1]):
        m = maps[0, c].double()
        norm = ((m - m.min()) / (m.max() - m.min())).float()
        up = F.interpolate(norm[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        assert up.min() == 0.0 and up.max() == 1.0
        expected = float(threshold_otsu(up.astype(np.float64), nbins=HIST_BINS))
        counts, _ = np.histogram(up, bins=HIST_BINS, range=(0.0, 1.0))
        check_against_exact_and_skimage(result.thresholds[0, c].item(), expected, counts, 0.0, 1.0, tol=1e-6)
        # The class's mask lies in what that threshold cuts, the pixels strictly above it (the
        # classes overlap, and each pixel goes to one of those above their thresholds).
        above = torch.from_numpy(up > result.thresholds[0, c].item())
        assert not (result.class_masks[0, c] & ~above).any() and result.class_masks[0, c].any()
