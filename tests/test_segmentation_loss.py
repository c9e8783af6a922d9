"""The fused segmentation-loss kernels against their torch reference, and the reference against the textbook formulas.

Tests that force the kernels take the `triton_device` fixture (conftest.py): compiled on a GPU
where one is visible, interpreted (TRITON_INTERPRET=1) on the CPU otherwise.

With IEEE float32 products (float32 inputs, and every input under the interpreter) both paths
compute in float32 from the same input values and differ only in summation order, so float32
results agree to ~1e-6 relative. With 16-bit inputs the values still agree that well, but the
gradients are rounded to the inputs' dtype at the end, hence the looser tolerance there.

Compiled with 16-bit inputs the kernels' dots take 16-bit operands (tensor cores). The forward
multiplies the inputs' own values, exactly, so the losses differ from the reference only in the
order of float32 sums; the bounds below (relative 1e-3 for float16, 1e-2 for bfloat16) are those
of 16-bit operands in general, loose for that. The backward rounds each per-logit gradient to
the inputs' type (relative error 2**-11 for float16, 2**-8 for bfloat16) before its products, and
the result again: its tolerance is 4 such roundings for float16 and 2 bfloat16 ulps, relative,
plus the same fraction of the largest gradient for entries that cancel towards 0.

Shapes are small and not multiples of the interpreter's blocks (64 pixels, 16 to 128 candidates,
16 to 64 channels) so that every masked edge is exercised in a few seconds.
"""

import pytest
import torch
import torchvision

from launch_spy import LaunchSpy

from magicseg_engine.kernels import segmentation_loss as seg
from magicseg_engine.kernels.precision import BF16, FP16, IEEE, dot_precision
from magicseg_engine.kernels.segmentation_loss import segmentation_losses, segmentation_losses_reference

ATOL, RTOL = 1e-6, 1e-5
# Gradients of 16-bit inputs come back in that dtype: a few of its ulps apart.
GRAD_TOL = {torch.float32: (ATOL, RTOL), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
# With 16-bit dot operands (compiled, 16-bit inputs): (atol, rtol) of the losses, and (atol as a
# fraction of the largest |gradient|, rtol) of the gradients; see the module docstring.
LOSS_TOL_16 = {torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 1e-2)}
GRAD_TOL_16 = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
IGNORE = 255
# The loss a caller would train on: distinct weights so that a mix-up of the two gradients shows.
FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0


def make_inputs(b, p, k, d, dtype=torch.float32, seed=0, device="cpu"):
    """Unit-norm embeddings (as CLIP's) and labels mixing candidates, background (-1) and ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.nn.functional.normalize(torch.randn(b, p, d, generator=gen), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(b, k, d, generator=gen), dim=-1)
    labels = torch.randint(-1, k, (b, p), generator=gen)
    labels[torch.rand(b, p, generator=gen) < 0.15] = IGNORE
    return pixels.to(device, dtype), classes.to(device, dtype), labels.to(device)


def both_paths(pixels, classes, labels, weights=(FOCAL_WEIGHT, DICE_WEIGHT), **kwargs):
    """[(focal, dice, grad pixels, grad classes)] of the Triton path, then of the reference."""
    results = []
    for use_triton in (True, False):
        pix = pixels.detach().clone().requires_grad_(True)
        cls = classes.detach().clone().requires_grad_(True)
        focal, dice = segmentation_losses(pix, cls, labels, use_triton=use_triton, **kwargs)
        grads = torch.autograd.grad(weights[0] * focal + weights[1] * dice, (pix, cls))
        results.append((focal, dice, *grads))
    return results


def sixteen_bit_dots(dtype) -> bool:
    """Whether the kernels, launched here on `dtype` inputs, multiply 16-bit operands."""
    return dot_precision(dtype, seg._INTERPRETED) != IEEE


def assert_grad_close(got, want, sixteen_bit):
    if sixteen_bit:
        fraction, rtol = GRAD_TOL_16[want.dtype]
        # At least two of the dtype's subnormal steps: both sides round to the dtype at the end.
        finfo = torch.finfo(want.dtype)
        atol = max(fraction * want.float().abs().max().item(), 2 * finfo.tiny * finfo.eps)
    else:
        atol, rtol = GRAD_TOL[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def assert_paths_agree(pixels, classes, labels, sixteen_bit=None, weights=(FOCAL_WEIGHT, DICE_WEIGHT), **kwargs):
    kwargs.setdefault("logit_scale", 10.0)
    sixteen_bit = sixteen_bit_dots(pixels.dtype) if sixteen_bit is None else sixteen_bit
    (focal, dice, g_pix, g_cls), (ref_focal, ref_dice, ref_pix, ref_cls) = both_paths(
        pixels, classes, labels, weights, **kwargs)
    assert focal.dtype == dice.dtype == torch.float32 and focal.ndim == dice.ndim == 0
    atol, rtol = LOSS_TOL_16[pixels.dtype] if sixteen_bit else (ATOL, RTOL)
    torch.testing.assert_close(focal, ref_focal, atol=atol, rtol=rtol)
    torch.testing.assert_close(dice, ref_dice, atol=atol, rtol=rtol)
    assert g_pix.dtype == pixels.dtype and g_cls.dtype == classes.dtype
    assert_grad_close(g_pix, ref_pix, sixteen_bit)
    assert_grad_close(g_cls, ref_cls, sixteen_bit)
    return focal, dice


SHAPES = [
    # b, p, k, d
    (1, 7, 1, 3),       # a single candidate, everything smaller than one block
    (2, 150, 37, 80),   # ragged in every dimension: 3 pixel tiles, 2 channel chunks, 2 class-gradient splits
    (3, 64, 16, 64),    # exact multiples of the blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_kernels_match_reference(shape, triton_device):
    assert_paths_agree(*make_inputs(*shape, seed=sum(shape), device=triton_device), bias=-2.0)


# One block of candidates covers up to 128; more take the multi-block path (the pixel gradient
# added block after block, the forward and class gradient with a grid axis over blocks).
MANY_CLASSES = [
    # b, p, k, d
    (2, 101, 128, 24),  # exactly one full block, odd pixel count
    (1, 77, 129, 20),   # one candidate over: a second, nearly empty block
    (1, 301, 300, 16),  # three blocks, 5 pixel tiles over 2 class-gradient splits
]


@pytest.mark.parametrize("shape", MANY_CLASSES, ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_many_classes_match_reference(shape, triton_device):
    assert_paths_agree(*make_inputs(*shape, seed=sum(shape), device=triton_device), bias=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs_accumulate_in_float32(dtype, triton_device):
    assert_paths_agree(*make_inputs(2, 90, 19, 40, dtype=dtype, seed=5, device=triton_device), bias=-1.0)


def test_fully_ignored_image_and_all_background_image(triton_device):
    pixels, classes, labels = make_inputs(3, 70, 5, 24, seed=7, device=triton_device)
    labels[0] = IGNORE
    labels[1] = -1
    focal, dice = assert_paths_agree(pixels, classes, labels)
    # The ignored image adds nothing: the losses equal those of the other two images, with its
    # K dice terms (each 1 - 1/1 = 0) still counted in the mean over B * K.
    rest_focal, rest_dice = segmentation_losses_reference(pixels[1:], classes[1:], labels[1:], logit_scale=10.0)
    torch.testing.assert_close(focal, rest_focal, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dice, rest_dice * 2 / 3, atol=ATOL, rtol=RTOL)


def test_everything_ignored_gives_zero_loss_and_gradient(triton_device):
    pixels, classes, labels = make_inputs(2, 20, 3, 16, seed=8, device=triton_device)
    (focal, dice, g_pix, g_cls), _ = both_paths(pixels, classes, torch.full_like(labels, IGNORE), logit_scale=10.0)
    assert focal.item() == 0 and dice.item() == 0
    assert not g_pix.any() and not g_cls.any()


def test_focal_options_strided_inputs_and_extreme_logits(triton_device):
    # Pixel embeddings as a conv head produces them, [B, D, h, w] seen as [B, h*w, D]; labels
    # above K are background like -1; int32 labels; no alpha weighting, gamma 0 (plain BCE), and
    # logits of +-50 where a naive sigmoid or log would overflow.
    gen = torch.Generator().manual_seed(9)
    pixels = torch.randn(2, 33, 9, 7, generator=gen).to(triton_device).flatten(2).transpose(1, 2)
    classes = torch.randn(2, 20, 33, generator=gen).to(triton_device)[:, ::2]
    labels = torch.randint(-1, 14, (2, 63), generator=gen, dtype=torch.int32).to(triton_device)
    assert not pixels.is_contiguous() and not classes.is_contiguous()
    assert_paths_agree(pixels, classes, labels, logit_scale=1.0, alpha=-1.0, gamma=0.0)
    assert_paths_agree(pixels * 8, classes * 8, labels, logit_scale=1.0, alpha=0.5, gamma=1.5)


def test_gradient_of_each_loss_alone_and_of_pixels_only(triton_device):
    pixels, classes, labels = make_inputs(2, 75, 6, 20, seed=10, device=triton_device)
    for pick in (0, 1):
        grads = []
        for use_triton in (True, False):
            pix = pixels.clone().requires_grad_(True)
            loss = segmentation_losses(pix, classes, labels, logit_scale=10.0, use_triton=use_triton)[pick]
            grads.append(torch.autograd.grad(loss, pix)[0])
        torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=RTOL)


def test_default_path_on_cpu_is_the_reference():
    pixels, classes, labels = make_inputs(2, 30, 4, 16, seed=11)
    want = segmentation_losses_reference(pixels, classes, labels, logit_scale=10.0)
    for use_triton in (None, False):
        got = segmentation_losses(pixels, classes, labels, logit_scale=10.0, use_triton=use_triton)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_reference_matches_textbook_formulas():
    pixels, classes, labels = make_inputs(2, 40, 3, 16, seed=12)
    labels[1, :5] = 7  # out of range: background
    scale, bias = 10.0, -1.0
    focal, dice = segmentation_losses_reference(pixels, classes, labels, logit_scale=scale, bias=bias)

    want_focal, want_dice, valid_pixels = 0.0, 0.0, 0
    for b in range(2):
        keep = labels[b] != IGNORE
        valid_pixels += int(keep.sum())
        for k in range(3):
            logits = torch.stack([scale * torch.dot(pixels[b, p], classes[b, k]) + bias for p in range(40)])[keep]
            targets = (labels[b][keep] == k).float()
            want_focal += torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
            prob = logits.sigmoid()
            want_dice += 1 - (2 * (prob * targets).sum() + 1) / (prob.sum() + targets.sum() + 1)
    torch.testing.assert_close(focal, want_focal / (valid_pixels * 3), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dice, want_dice / 6, atol=ATOL, rtol=RTOL)


def test_rejects_mismatched_arguments():
    pixels, classes, labels = make_inputs(2, 10, 3, 16)
    with pytest.raises(ValueError):
        segmentation_losses(pixels, classes[:, :, :8], labels, logit_scale=1.0)
    with pytest.raises(ValueError):
        segmentation_losses(pixels, classes, labels[:1], logit_scale=1.0)
    with pytest.raises(TypeError):
        segmentation_losses(pixels, classes, labels.float(), logit_scale=1.0)


# ------------------------------------------------------------------------------------------------
# Dot precision, block sizes and the class-gradient grid


@pytest.mark.parametrize(("dtype", "compiled", "interpreted"), [
    (torch.float32, IEEE, IEEE),
    (torch.float16, FP16, IEEE),
    (torch.bfloat16, BF16, IEEE),
    (torch.float64, IEEE, IEEE),
    # Mixed 16-bit inputs promote to float32.
    (torch.promote_types(torch.float16, torch.bfloat16), IEEE, IEEE),
], ids=str)
def test_dot_precision_by_dtype_and_mode(dtype, compiled, interpreted):
    assert dot_precision(dtype, interpreted=False) == compiled
    assert dot_precision(dtype, interpreted=True) == interpreted


@pytest.mark.parametrize(("pixel_dtype", "class_dtype"), [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
], ids=str)
def test_every_launch_gets_the_precision_of_its_inputs(monkeypatch, triton_device, pixel_dtype, class_dtype):
    spies = {name: LaunchSpy(getattr(seg, name)) for name in (
        "_seg_loss_fwd_kernel", "_seg_loss_grad_pixels_kernel", "_seg_loss_grad_classes_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(seg, name, spy)
    pixels, classes, labels = make_inputs(1, 40, 5, 16, seed=13, device=triton_device)
    pixels, classes = pixels.to(pixel_dtype).requires_grad_(True), classes.to(class_dtype).requires_grad_(True)
    focal, dice = segmentation_losses(pixels, classes, labels, logit_scale=10.0, use_triton=True)
    (focal + dice).backward()
    want = dot_precision(torch.promote_types(pixel_dtype, class_dtype), seg._INTERPRETED)
    if seg._INTERPRETED:
        assert want == IEEE
    assert {name: spy.dots for name, spy in spies.items()} == {name: [want] for name in spies}


def force_float16_operands(monkeypatch):
    """The kernels' 16-bit branch for float16 inputs, under the interpreter too (whose float16
    products are right; compiled, it is the branch float16 takes anyway)."""
    monkeypatch.setattr(seg, "dot_precision", lambda dtype, interpreted: FP16 if dtype == torch.float16 else IEEE)


@pytest.mark.parametrize("shape", [(2, 150, 37, 80), (1, 77, 129, 20)], ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_float16_operand_path_matches_reference(monkeypatch, triton_device, shape):
    force_float16_operands(monkeypatch)
    assert_paths_agree(*make_inputs(*shape, dtype=torch.float16, seed=14, device=triton_device),
                       sixteen_bit=True, bias=-1.0)


@pytest.mark.slow
def test_float16_gradient_tiles_are_scaled_before_rounding(monkeypatch, triton_device):
    """Per-logit gradients of ~1e-7, float16 subnormals, summed over 4096 nearly equal pixels
    into class gradients of ~6e-4: rounded unscaled, every term would carry the same error of a
    few percent, and so would the sum."""
    force_float16_operands(monkeypatch)
    gen = torch.Generator().manual_seed(15)
    b, p, k, d = 1, 4096, 2, 16
    common = torch.randn(d, generator=gen)
    pixels = torch.nn.functional.normalize(common + 0.02 * torch.randn(b, p, d, generator=gen), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(b, k, d, generator=gen), dim=-1)
    labels = torch.full((b, p), -1, device=triton_device)
    pixels, classes = pixels.to(triton_device, torch.float16), classes.to(triton_device, torch.float16)
    (_, _, _, g_cls), (_, _, _, ref_cls) = both_paths(pixels, classes, labels, weights=(1e-2, 0.0), logit_scale=1.0)
    assert 1e-4 < ref_cls.abs().max() < 1e-3
    assert_grad_close(g_cls, ref_cls, sixteen_bit=True)


def test_one_block_of_candidates_up_to_128():
    for compiled in (False, True):
        for dot in (IEEE, BF16):
            assert seg._blocks(128, 512, compiled, dot)[1] == 128
            assert seg._blocks(129, 512, compiled, dot)[1] == 128
            assert seg._blocks(20, 512, compiled, dot)[1] == 32
            assert seg._blocks(1, 3, compiled, dot)[1] == 16  # tl.dot's smallest


def test_class_gradient_grid_fills_the_gpu_within_its_memory_budget():
    sms = 132  # H100 SXM
    budget = seg._CLASS_PARTIAL_BYTES
    # b, k_blocks, p_tiles, k, d: 64x64 and 128x128 pixels, 20 to 150 candidates. Without splits
    # these grids had 8 to 16 programs; now at least a full wave, 4 per SM where memory allows.
    cases = [(8, 1, 64, 20, 512), (4, 2, 256, 150, 512), (8, 2, 256, 150, 512), (1, 1, 256, 100, 512),
             (2, 1, 256, 100, 512)]
    for b, k_blocks, p_tiles, k, d in cases:
        splits = seg._class_splits(b, k_blocks, p_tiles, k, d, sms)
        assert 1 <= splits <= p_tiles
        assert splits * b * k * d * 4 <= budget
        assert k_blocks * splits * b >= sms, (b, k_blocks, p_tiles, k, d, splits)
    assert seg._class_splits(8, 1, 64, 20, 512, sms) == 64  # every tile its own program: 512
    assert seg._class_splits(4, 2, 256, 150, 512, sms) * 4 * 2 >= 3 * sms
    # Short images: one tile per program.
    assert seg._class_splits(2, 2, 16, 171, 768, sms) == 16
    # Wide partial sums: as many splits as the budget holds, at least one.
    assert seg._class_splits(1, 1, 1024, 100, 768, sms) == budget // (100 * 768 * 4)
    assert seg._class_splits(64, 2, 4096, 171, 1024, sms) == 1
    # The interpreter counts as one SM: a few programs, several splits on small batches.
    assert seg._class_splits(1, 1, 5, 20, 16, 1) == 4
    assert seg._class_splits(1, 3, 5, 300, 16, 1) == 2
    assert seg._class_splits(3, 1, 10, 16, 64, 1) == 2
    assert seg._class_splits(2, 0, 0, 0, 16, sms) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(8, 64 * 64, 20, 512), (3, 4097, 128, 200), (2, 999, 129, 77),
                                   (4, 128 * 128, 150, 512), (2, 1001, 171, 768)],
                         ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_compiled_kernels_match_reference_on_gpu(shape, dtype):
    pixels, classes, labels = make_inputs(*shape, dtype=dtype, device="cuda")
    sixteen_bit = dtype != torch.float32
    # 16-bit inputs: the upstream gradient scaled by the pixel count, as a loss scaler would, so
    # that the gradients are normal float16 numbers (unscaled they are ~1e-7, subnormal).
    weights = (FOCAL_WEIGHT, DICE_WEIGHT)
    if sixteen_bit:
        weights = tuple(w * shape[0] * shape[1] for w in weights)
    (focal, dice, g_pix, g_cls), (ref_focal, ref_dice, ref_pix, ref_cls) = both_paths(
        pixels, classes, labels, weights, logit_scale=10.0, bias=-2.0)
    assert sixteen_bit == sixteen_bit_dots(dtype)
    # Long float32 sums in different orders: a little looser than on the CPU's small shapes.
    atol, rtol = LOSS_TOL_16[dtype] if sixteen_bit else (1e-5, 1e-4)
    torch.testing.assert_close(focal, ref_focal, atol=atol, rtol=rtol)
    torch.testing.assert_close(dice, ref_dice, atol=atol, rtol=rtol)
    if sixteen_bit:
        assert_grad_close(g_pix, ref_pix, True)
        assert_grad_close(g_cls, ref_cls, True)
    else:
        torch.testing.assert_close(g_pix, ref_pix, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(g_cls, ref_cls, atol=1e-6, rtol=1e-4)
