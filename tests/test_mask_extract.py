"""Mask extraction: the Triton kernels against the torch reference, prompts, Otsu, synthetic shapes.

Tests that force the kernels take the `triton_device` fixture (conftest.py): compiled on a GPU
where one is visible, interpreted (TRITON_INTERPRET=1) on the CPU otherwise.
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicseg_engine.kernels import mask_extract
from magicseg_engine.kernels.mask_extract import (
    HIST_BINS,
    INVALID_THRESHOLD,
    POSITIVE_SPREAD,
    extract_masks,
    extract_masks_reference,
    otsu_threshold,
)

# The kernel rounds the bilinear sum independently of ATen (either side may fuse multiply-adds),
# so upsampled values may differ in the last bits. Labels may then differ only where the
# reference's decision is that close to a tie between classes or to a threshold.
EPS = 1e-5
# Whether the kernels run compiled here (on the GPU) rather than interpreted.
COMPILED = not mask_extract._INTERPRETED


def random_maps(gen, B, C, h, w):
    """Non-negative maps of very different scales, with a constant and an all-zero map."""
    maps = torch.rand(B, C, h, w, generator=gen) ** 2
    maps = maps * 10 ** (6 * torch.rand(B, C, 1, 1, generator=gen) - 3)
    valid = torch.rand(B, C, generator=gen) > 0.25
    valid[:, 0] = True
    if C >= 2:
        maps[0, 1] = 7.0  # constant, valid: normalises to 0 and never wins
        valid[0, 1] = True
    if C >= 3:
        maps[-1, 2] = 0.0
    if B >= 2:
        valid[1, 1:] = False
        maps[1, 1:] *= 1e3  # invalid maps that would win everywhere if they counted
    return maps, valid


def decision_is_ambiguous(up, thresholds, valid):
    """[B, H, W]: the reference's label at that pixel sits within EPS of a tie or a threshold."""
    near_threshold = ((up - thresholds[..., None, None]).abs() < EPS) & valid[..., None, None]
    above = (up > thresholds[..., None, None]) & valid[..., None, None]
    ambiguous = near_threshold.any(1)
    if up.shape[1] >= 2:
        top2 = torch.where(above, up, -1.0).topk(2, dim=1).values
        ambiguous |= (top2[:, 1] >= 0) & (top2[:, 0] - top2[:, 1] < EPS)
    return ambiguous


def assert_labels_agree(ref, tri, valid):
    assert tri.labels.dtype == torch.uint8 and tri.labels.shape == ref.labels.shape
    differ = ref.labels != tri.labels.to(ref.labels.device)
    if differ.any():
        valid = valid.to(ref.labels.device)
        ambiguous = decision_is_ambiguous(ref.normalized, ref.thresholds, valid)
        assert ambiguous[differ].all(), "labels differ away from ties and thresholds"
        assert differ.float().mean() < 1e-3


def on_cpu(out):
    """An ExtractedMasks with every tensor on the CPU, for comparisons with the reference's."""
    prompts = replace(out.prompts, **{f: getattr(out.prompts, f).cpu() for f in ("boxes", "points", "point_labels")})
    normalized = None if out.normalized is None else out.normalized.cpu()
    return replace(out, labels=out.labels.cpu(), class_masks=out.class_masks.cpu(), thresholds=out.thresholds.cpu(),
                   normalized=normalized, prompts=prompts)


def assert_kernel_matches_reference(ref, tri, valid):
    """Interpreted, the kernel's histograms equal the reference's, hence Otsu's thresholds and
    (but for ties) the labels. Compiled, rounding may move a histogram count across a bin edge,
    and Otsu's pick rarely moves with it: labels and prompts are compared where it does not."""
    tri = on_cpu(tri)
    torch.testing.assert_close(tri.normalized, ref.normalized, atol=1e-6, rtol=0)
    if not COMPILED:
        torch.testing.assert_close(tri.thresholds, ref.thresholds, atol=0, rtol=0)
    else:
        torch.testing.assert_close(tri.thresholds, ref.thresholds, atol=1.0 / HIST_BINS, rtol=0)
        if not torch.equal(tri.thresholds, ref.thresholds):
            return
    assert_labels_agree(ref, tri, valid)
    assert_prompts_agree(ref, tri)


def assert_prompts_agree(ref, tri):
    """Prompts are shared torch code on the labels and winning values; where the labels agree,
    boxes agree exactly and points may differ only by a near-tie of the winning value."""
    tri_p = tri.prompts
    if not torch.equal(ref.labels, tri.labels.cpu()):
        return
    torch.testing.assert_close(tri_p.boxes.cpu(), ref.prompts.boxes, atol=0, rtol=0)
    torch.testing.assert_close(tri_p.point_labels.cpu(), ref.prompts.point_labels, atol=0, rtol=0)
    ref_pts = ref.prompts.points.long()
    tri_pts = tri_p.points.cpu().long()
    differ = (ref_pts != tri_pts).any(-1)
    up = ref.normalized
    for b, c, p in differ.nonzero().tolist():
        if ref.prompts.point_labels[b, c, p] != 1:
            continue
        (xr, yr), (xt, yt) = ref_pts[b, c, p].tolist(), tri_pts[b, c, p].tolist()
        assert ref.labels[b, yt, xt] == c + 1
        if not differ[b, c, :p].any():  # the first difference: it must be a near-tie
            assert abs(up[b, c, yr, xr] - up[b, c, yt, xt]) < EPS


CASES = [
    # B, C, h, w, H, W, threshold
    (2, 3, 8, 8, 64, 64, "otsu"),
    (2, 3, 8, 8, 64, 64, 0.3),
    (3, 6, 7, 9, 61, 45, "otsu"),
    (2, 5, 7, 9, 61, 45, 0.5),
    (1, 1, 8, 8, 64, 64, "otsu"),
    (2, 2, 9, 7, 33, 70, 0.0),
    (1, 4, 16, 16, 12, 10, "otsu"),  # downsampling
    (1, 4, 64, 64, 512, 512, "otsu"),
]


@pytest.mark.parametrize("B,C,h,w,H,W,threshold", CASES)
def test_triton_matches_reference(B, C, h, w, H, W, threshold, triton_device):
    gen = torch.Generator().manual_seed(B * 1000 + C * 100 + h + w)
    maps, valid = random_maps(gen, B, C, h, w)
    ref = extract_masks_reference(maps, valid, (H, W), threshold, 2, 2, return_normalized=True)
    tri = extract_masks(maps.to(triton_device), valid.to(triton_device), (H, W), threshold, 2, 2,
                        use_triton=True, return_normalized=True)

    assert tri.labels.device.type == triton_device
    assert ref.normalized.shape == tri.normalized.shape == (B, C, H, W)
    assert_kernel_matches_reference(ref, tri, valid)

    for out in (ref, on_cpu(tri)):
        assert out.labels.shape == (B, H, W) and out.labels.dtype == torch.uint8
        assert out.class_masks.shape == (B, C, H, W) and out.class_masks.dtype == torch.bool
        assert out.thresholds.shape == (B, C) and out.thresholds.dtype == torch.float32
        assert out.prompts.boxes.shape == (B, C, 4) and out.prompts.boxes.dtype == torch.float32
        assert out.prompts.points.shape == (B, C, 4, 2) and out.prompts.points.dtype == torch.float32
        assert out.prompts.point_labels.shape == (B, C, 4)
        assert out.prompts.point_labels.dtype == torch.int64
        assert (out.thresholds[~valid] == INVALID_THRESHOLD).all()
        # Invalid classes never win; constant maps normalise to 0 and never win.
        lab = out.labels.long()
        winner_valid = valid.gather(1, (lab - 1).clamp(min=0).flatten(1)).view_as(lab)
        assert winner_valid[lab > 0].all()
        if C >= 2:
            assert (out.normalized[0, 1] == 0).all()
            assert not (out.labels[0] == 2).any()
        if B >= 2:
            assert (out.labels[1] <= 1).all()
        classes = torch.arange(1, C + 1, dtype=torch.uint8).view(1, C, 1, 1)
        assert torch.equal(out.class_masks, out.labels[:, None] == classes)
        absent = ~out.class_masks.flatten(2).any(-1)
        assert (out.prompts.boxes[absent] == -1).all()
        assert (out.prompts.point_labels[absent] == -1).all()

    # Not asking for the upsampled maps changes nothing else.
    if H * W > 64 * 64:
        return
    lean = extract_masks(maps.to(triton_device), valid.to(triton_device), (H, W), threshold, 2, 2, use_triton=True)
    assert lean.normalized is None
    assert torch.equal(lean.labels, tri.labels)
    assert torch.equal(lean.thresholds, tri.thresholds)


def test_prompt_semantics():
    gen = torch.Generator().manual_seed(7)
    B, C, H, W = 2, 3, 48, 40
    maps = F.interpolate(torch.rand(B, C, 4, 4, generator=gen), size=(8, 8), mode="bilinear")
    valid = torch.ones(B, C, dtype=torch.bool)
    out = extract_masks_reference(maps, valid, (H, W), "otsu", 3, 2, return_normalized=True)
    labels, up, pr = out.labels.long(), out.normalized, out.prompts
    for b in range(B):
        for c in range(C):
            region = labels[b] == c + 1
            if not region.any():
                assert (pr.boxes[b, c] == -1).all() and (pr.point_labels[b, c] == -1).all()
                continue
            ys, xs = region.nonzero(as_tuple=True)
            box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert pr.boxes[b, c].tolist() == box
            pos = pr.points[b, c][pr.point_labels[b, c] == 1].long()
            neg = pr.points[b, c][pr.point_labels[b, c] == 0].long()
            assert len(pos) >= 1 and len(neg) >= 1
            assert (pr.point_labels[b, c, :3] != 0).all() and (pr.point_labels[b, c, 3:] != 1).all()
            # The first positive point is the class's highest value on its region.
            assert up[b, c, pos[0, 1], pos[0, 0]] == up[b, c][region].max()
            assert region[pos[:, 1], pos[:, 0]].all()
            assert not region[neg[:, 1], neg[:, 0]].any()
            r2 = POSITIVE_SPREAD**2 * region.sum().item() / math.pi
            for i in range(len(pos)):
                for j in range(i):
                    assert ((pos[i] - pos[j]) ** 2).sum().item() > r2


@pytest.mark.parametrize("num_positive,num_negative", [(0, 0), (0, 2), (3, 0)])
def test_point_counts(num_positive, num_negative, triton_device):
    gen = torch.Generator().manual_seed(11)
    maps, valid = random_maps(gen, 2, 3, 8, 8)
    ref = extract_masks_reference(maps, valid, (32, 32), "otsu", num_positive, num_negative)
    tri = on_cpu(extract_masks(maps.to(triton_device), valid.to(triton_device), (32, 32), "otsu",
                               num_positive, num_negative, use_triton=True))
    P = num_positive + num_negative
    for out in (ref, tri):
        assert out.prompts.points.shape == (2, 3, P, 2)
        labels = out.prompts.point_labels
        assert ((labels[..., :num_positive] == 1) | (labels[..., :num_positive] == -1)).all()
        assert ((labels[..., num_positive:] == 0) | (labels[..., num_positive:] == -1)).all()
    # Which classes have points follows from the labels: equal unless a compiled kernel's
    # threshold moved by a histogram bin (see assert_kernel_matches_reference).
    if not COMPILED or torch.equal(tri.thresholds, ref.thresholds):
        assert torch.equal(ref.prompts.point_labels, tri.prompts.point_labels)


def test_rejects_bad_arguments():
    maps, valid = torch.rand(1, 2, 4, 4), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        extract_masks_reference(maps[0], valid, (8, 8))
    with pytest.raises(ValueError):
        extract_masks_reference(maps, valid[:, :1], (8, 8))
    with pytest.raises(ValueError):
        extract_masks_reference(maps, valid, (8, 8), threshold="mean")
    with pytest.raises(ValueError):
        extract_masks_reference(maps, valid, (8, 8), threshold=1.5)


# ------------------------------------------------------------------------------------------------
# Synthetic maps with known shapes


def draw_shapes(gen, B, C, size, lo=72, hi=104, pad=12):
    """Discs and rectangles, one per class, each inside its own quadrant (so they never touch)."""
    q = size // 2
    truth = torch.zeros(B, C, size, size, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for b in range(B):
        for c, quad in enumerate(torch.randperm(4, generator=gen)[:C].tolist()):
            s, t = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=gen))
            disc = bool(torch.rand(1, generator=gen) < 0.5)
            t = s if disc else t
            y0 = (quad // 2) * q + int(torch.randint(pad, q - pad - t + 1, (1,), generator=gen))
            x0 = (quad % 2) * q + int(torch.randint(pad, q - pad - s + 1, (1,), generator=gen))
            if disc:
                cy, cx = y0 + (s - 1) / 2, x0 + (s - 1) / 2
                truth[b, c] = (yy - cy) ** 2 + (xx - cx) ** 2 <= (s / 2) ** 2
            else:
                truth[b, c, y0 : y0 + t, x0 : x0 + s] = True
    return truth


def coarse_attention(gen, truth, factor):
    """Area-downsample, blur (3x3 binomial), add noise and scale each map arbitrarily."""
    B, C, H, W = truth.shape
    m = F.avg_pool2d(truth.float(), factor).reshape(1, B * C, H // factor, W // factor)
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None]).expand(B * C, 1, 3, 3)
    m = F.conv2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), kernel, groups=B * C)
    m = m.view(B, C, H // factor, W // factor)
    m = m + 0.05 * torch.rand(m.shape, generator=gen)
    return m * 10 ** (4 * torch.rand(B, C, 1, 1, generator=gen) - 2)


def true_box(mask):
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("threshold", ["otsu", 0.5])
@pytest.mark.parametrize("use_triton", [False, True])
def test_synthetic_shapes_are_recovered(threshold, use_triton, triton_device):
    gen = torch.Generator().manual_seed(3)
    B, C, size, factor = 4, 3, 256, 8
    truth = draw_shapes(gen, B, C, size)
    maps = coarse_attention(gen, truth, factor)
    # A fourth, invalid class whose map is a strong blob over everything: it must be ignored.
    decoy = torch.rand(B, 1, size // factor, size // factor, generator=gen) + 5.0
    maps = torch.cat([maps, decoy * 1e3], 1)
    valid = torch.ones(B, C + 1, dtype=torch.bool)
    valid[:, C] = False

    device = triton_device if use_triton else "cpu"
    out = on_cpu(extract_masks(maps.to(device), valid.to(device), (size, size), threshold, 3, 2, use_triton=use_triton))
    masks = out.class_masks[:, :C]
    assert not out.class_masks[:, C].any()
    iou = (masks & truth).sum((2, 3)).float() / (masks | truth).sum((2, 3)).float()
    assert (iou > 0.9).all(), iou
    pts, plab = out.prompts.points.long(), out.prompts.point_labels
    for b in range(B):
        for c in range(C):
            assert (out.prompts.boxes[b, c] - true_box(truth[b, c])).abs().max() <= 4
            assert (plab[b, c] == torch.tensor([1, 1, 1, 0, 0])).all()
            on_shape = truth[b, c][pts[b, c, :, 1], pts[b, c, :, 0]]
            assert on_shape[:3].all(), "a positive point is off the shape"
            assert not on_shape[3:].any(), "a negative point is on the shape"


# ------------------------------------------------------------------------------------------------
# Otsu


def otsu_numpy(x, nbins=256):
    """scikit-image's threshold_otsu for float data, written out."""
    if x.min() == x.max():
        return float(x.min())
    hist, edges = np.histogram(x, bins=nbins, range=(x.min(), x.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centres) / w1
    m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[np.argmax(between)])


def reference_otsu():
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        return otsu_numpy
    return lambda x: float(threshold_otsu(x, nbins=HIST_BINS))


def test_otsu_matches_reference_on_bimodal_data():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        n1, n2 = rng.integers(200, 3000, size=2)
        mu1, mu2 = sorted(rng.uniform(-5, 5, size=2))
        sd1, sd2 = rng.uniform(0.2, 1.5, size=2)
        rows.append(np.concatenate([rng.normal(mu1, sd1, n1), rng.normal(mu2 + 3, sd2, n2)]))
    expected = reference_otsu()
    for x in rows:
        got = otsu_threshold(torch.from_numpy(x)).item()
        width = (x.max() - x.min()) / HIST_BINS
        assert abs(got - expected(x)) <= width + 1e-9
    # Batched rows give the rows' own thresholds.
    n = min(len(x) for x in rows)
    batch = np.stack([x[:n] for x in rows])
    got = otsu_threshold(torch.from_numpy(batch).view(4, 4, n))
    for i, x in enumerate(batch):
        assert abs(got.view(-1)[i].item() - expected(x)) <= (x.max() - x.min()) / HIST_BINS + 1e-9
    # A constant row: its own value, so nothing is strictly above it.
    assert otsu_threshold(torch.full((1, 50), 0.25)).item() == 0.25


# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B,C,h,w,H,W,threshold", CASES)
def test_compiled_kernel_matches_reference_on_gpu(B, C, h, w, H, W, threshold):
    gen = torch.Generator().manual_seed(B * 1000 + C * 100 + h + w)
    maps, valid = random_maps(gen, B, C, h, w)
    ref = extract_masks_reference(maps, valid, (H, W), threshold, 2, 2, return_normalized=True)
    tri = extract_masks(maps.cuda(), valid.cuda(), (H, W), threshold, 2, 2, return_normalized=True)
    assert tri.labels.is_cuda  # the default path for CUDA tensors
    assert_kernel_matches_reference(ref, tri, valid)
