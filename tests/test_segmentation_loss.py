"""The fused segmentation-loss kernels against their torch reference, and the reference against the textbook formulas.

On machines without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py). Both
paths compute in float32 from the same input values and differ only in summation order, so
float32 results agree to ~1e-6 relative. With 16-bit inputs the values still agree that well,
but the gradients are rounded to the inputs' dtype at the end, hence the looser tolerance there.
Shapes are small and not multiples of the interpreter's blocks (64 pixels, 16 or 32 candidates,
16 to 64 channels) so that every masked edge is exercised in a few seconds.
"""

import pytest
import torch
import torchvision

from magicseg_engine.kernels.segmentation_loss import segmentation_losses, segmentation_losses_reference

ATOL, RTOL = 1e-6, 1e-5
# Gradients of 16-bit inputs come back in that dtype: a few of its ulps apart.
GRAD_TOL = {torch.float32: (ATOL, RTOL), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
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


def both_paths(pixels, classes, labels, **kwargs):
    """[(focal, dice, grad pixels, grad classes)] of the Triton path, then of the reference."""
    results = []
    for use_triton in (True, False):
        pix = pixels.detach().clone().requires_grad_(True)
        cls = classes.detach().clone().requires_grad_(True)
        focal, dice = segmentation_losses(pix, cls, labels, use_triton=use_triton, **kwargs)
        grads = torch.autograd.grad(FOCAL_WEIGHT * focal + DICE_WEIGHT * dice, (pix, cls))
        results.append((focal, dice, *grads))
    return results


def assert_paths_agree(pixels, classes, labels, **kwargs):
    kwargs.setdefault("logit_scale", 10.0)
    (focal, dice, g_pix, g_cls), (ref_focal, ref_dice, ref_pix, ref_cls) = both_paths(pixels, classes, labels, **kwargs)
    assert focal.dtype == dice.dtype == torch.float32 and focal.ndim == dice.ndim == 0
    torch.testing.assert_close(focal, ref_focal, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dice, ref_dice, atol=ATOL, rtol=RTOL)
    assert g_pix.dtype == pixels.dtype and g_cls.dtype == classes.dtype
    atol, rtol = GRAD_TOL[pixels.dtype]
    torch.testing.assert_close(g_pix, ref_pix, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_cls, ref_cls, atol=atol, rtol=rtol)
    return focal, dice


SHAPES = [
    # b, p, k, d
    (1, 7, 1, 3),       # a single candidate, everything smaller than one block
    (2, 150, 37, 80),   # ragged in every dimension: 3 pixel tiles, 2 candidate blocks, 2 channel chunks
    (3, 64, 16, 64),    # exact multiples of the blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_kernels_match_reference(shape):
    assert_paths_agree(*make_inputs(*shape, seed=sum(shape)), bias=-2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs_accumulate_in_float32(dtype):
    assert_paths_agree(*make_inputs(2, 90, 19, 40, dtype=dtype, seed=5), bias=-1.0)


def test_fully_ignored_image_and_all_background_image():
    pixels, classes, labels = make_inputs(3, 70, 5, 24, seed=7)
    labels[0] = IGNORE
    labels[1] = -1
    focal, dice = assert_paths_agree(pixels, classes, labels)
    # The ignored image adds nothing: the losses equal those of the other two images, with its
    # K dice terms (each 1 - 1/1 = 0) still counted in the mean over B * K.
    rest_focal, rest_dice = segmentation_losses_reference(pixels[1:], classes[1:], labels[1:], logit_scale=10.0)
    torch.testing.assert_close(focal, rest_focal, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dice, rest_dice * 2 / 3, atol=ATOL, rtol=RTOL)


def test_everything_ignored_gives_zero_loss_and_gradient():
    pixels, classes, labels = make_inputs(2, 20, 3, 16, seed=8)
    (focal, dice, g_pix, g_cls), _ = both_paths(pixels, classes, torch.full_like(labels, IGNORE), logit_scale=10.0)
    assert focal.item() == 0 and dice.item() == 0
    assert not g_pix.any() and not g_cls.any()


def test_focal_options_strided_inputs_and_extreme_logits():
    # Pixel embeddings as a conv head produces them, [B, D, h, w] seen as [B, h*w, D]; labels
    # above K are background like -1; int32 labels; no alpha weighting, gamma 0 (plain BCE), and
    # logits of +-50 where a naive sigmoid or log would overflow.
    gen = torch.Generator().manual_seed(9)
    pixels = torch.randn(2, 33, 9, 7, generator=gen).flatten(2).transpose(1, 2)
    classes = torch.randn(2, 20, 33, generator=gen)[:, ::2]
    labels = torch.randint(-1, 14, (2, 63), generator=gen, dtype=torch.int32)
    assert not pixels.is_contiguous() and not classes.is_contiguous()
    assert_paths_agree(pixels, classes, labels, logit_scale=1.0, alpha=-1.0, gamma=0.0)
    assert_paths_agree(pixels * 8, classes * 8, labels, logit_scale=1.0, alpha=0.5, gamma=1.5)


def test_gradient_of_each_loss_alone_and_of_pixels_only():
    pixels, classes, labels = make_inputs(2, 75, 6, 20, seed=10)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 64 * 64, 20, 512), (4, 128 * 128, 150, 512), (2, 1000, 171, 768)],
                         ids=lambda s: "b{}p{}k{}d{}".format(*s))
def test_compiled_kernels_match_reference_on_gpu(shape, dtype):
    pixels, classes, labels = make_inputs(*shape, dtype=dtype, device="cuda")
    (focal, dice, g_pix, g_cls), (ref_focal, ref_dice, ref_pix, ref_cls) = both_paths(
        pixels, classes, labels, logit_scale=10.0, bias=-2.0)
    # Long float32 sums in different orders: a little looser than on the CPU's small shapes.
    torch.testing.assert_close(focal, ref_focal, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dice, ref_dice, atol=1e-5, rtol=1e-4)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(g_pix.float(), ref_pix.float(), atol=max(atol, 1e-6), rtol=max(rtol, 1e-4))
    torch.testing.assert_close(g_cls.float(), ref_cls.float(), atol=max(atol, 1e-6), rtol=max(rtol, 1e-4))
