"""The counterfactual hinge kernels against their torch reference, and the reference against cosine_similarity.

Tests that force the kernels take the `triton_device` fixture (conftest.py): compiled on a GPU
where one is visible, interpreted (TRITON_INTERPRET=1) on the CPU otherwise. Both paths reduce
in float32 from the same values (the kernels have no tl.dot); 16-bit gradients are rounded to
their dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from magicseg_engine.kernels.counterfactual_loss import counterfactual_loss, counterfactual_loss_reference

ATOL, RTOL = 1e-6, 1e-5
GRAD_TOL = {torch.float32: (ATOL, RTOL), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}


def make_pair(b, d, dtype=torch.float32, seed=0, device="cpu"):
    # Negatives correlated with the positives, so that cosines spread on both sides of 0.
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(b, d, generator=gen)
    neg = torch.randn(b, d, generator=gen) + torch.randn(b, 1, generator=gen) * pos
    return pos.to(device, dtype), neg.to(device, dtype)


def both_paths(pos, neg, **kwargs):
    """[(loss, grad pos, grad neg)] of the Triton path, then of the reference."""
    results = []
    for use_triton in (True, False):
        p = pos.detach().clone().requires_grad_(True)
        n = neg.detach().clone().requires_grad_(True)
        loss = counterfactual_loss(p, n, use_triton=use_triton, **kwargs)
        results.append((loss, *torch.autograd.grad(loss, (p, n))))
    return results


def assert_paths_agree(pos, neg, **kwargs):
    (loss, g_pos, g_neg), (ref, ref_pos, ref_neg) = both_paths(pos, neg, **kwargs)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=RTOL)
    assert g_pos.dtype == pos.dtype and g_neg.dtype == neg.dtype
    atol, rtol = GRAD_TOL[pos.dtype]
    torch.testing.assert_close(g_pos, ref_pos, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_neg, ref_neg, atol=atol, rtol=rtol)
    return loss, g_pos, g_neg


@pytest.mark.parametrize("margin", [0.0, 0.2, -0.3])
@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (33, 300), (16, 256)], ids=lambda s: "b{}d{}".format(*s))
def test_kernels_match_reference(shape, margin, triton_device):
    assert_paths_agree(*make_pair(*shape, seed=shape[0], device=triton_device), margin=margin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs(dtype, triton_device):
    assert_paths_agree(*make_pair(20, 130, dtype=dtype, seed=3, device=triton_device), margin=0.1)


def test_rows_below_the_margin_get_no_gradient(triton_device):
    gen = torch.Generator().manual_seed(4)
    pos, neg = make_pair(6, 40, seed=4, device=triton_device)
    neg[:3] = -pos[:3]                                        # cos = -1: inactive at margin 0
    neg[3:] = 0.5 * pos[3:] + torch.randn(3, 40, generator=gen).to(triton_device)  # cos about 0.4: active
    loss, g_pos, g_neg = assert_paths_agree(pos, neg)
    assert not g_pos[:3].any() and not g_neg[:3].any()
    assert g_neg[3].abs().sum() > 0
    # With the margin between row 4's and row 5's cosines, only the row above it is pushed.
    cos = F.cosine_similarity(pos, neg, dim=1)
    margin = float(cos[4:].mean())
    _, g_pos, g_neg = assert_paths_agree(pos, neg, margin=margin)
    below = 4 if cos[4] < cos[5] else 5
    assert not g_pos[below].any() and not g_neg[below].any()
    assert g_pos[9 - below].abs().sum() > 0


def test_zero_vectors_are_harmless(triton_device):
    pos, neg = make_pair(4, 24, seed=5, device=triton_device)
    pos[0] = 0
    neg[1] = 0
    pos[2] = neg[2] = 0
    loss, g_pos, g_neg = assert_paths_agree(pos, neg)
    assert torch.isfinite(loss) and torch.isfinite(g_pos).all() and torch.isfinite(g_neg).all()
    assert not g_pos[:3].any() and not g_neg[:3].any()


def test_strided_inputs_and_empty_batch(triton_device):
    gen = torch.Generator().manual_seed(6)
    pos = torch.randn(40, 9, generator=gen).to(triton_device).t()      # [9, 40], column-major
    neg = torch.randn(9, 80, generator=gen).to(triton_device)[:, ::2]  # every other column
    assert not pos.is_contiguous() and not neg.is_contiguous()
    assert_paths_agree(pos, neg, margin=0.05)
    empty = torch.zeros(0, 8, device=triton_device)
    assert counterfactual_loss(empty, empty, use_triton=True).item() == 0


def test_reference_matches_cosine_similarity():
    pos, neg = make_pair(12, 33, seed=7)
    for margin in (0.0, 0.25):
        want = torch.clamp(F.cosine_similarity(pos, neg, dim=1) - margin, min=0).mean()
        torch.testing.assert_close(counterfactual_loss_reference(pos, neg, margin=margin), want, atol=ATOL, rtol=RTOL)
    # The default path on the CPU is the reference.
    assert torch.equal(counterfactual_loss(pos, neg), counterfactual_loss_reference(pos, neg))


def test_rejects_mismatched_arguments():
    with pytest.raises(ValueError):
        counterfactual_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        counterfactual_loss(torch.zeros(3, 4, 1), torch.zeros(3, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 512), (1000, 768), (7, 5000)], ids=lambda s: "b{}d{}".format(*s))
def test_compiled_kernels_match_reference_on_gpu(shape, dtype):
    pos, neg = make_pair(*shape, dtype=dtype, device="cuda")
    (loss, g_pos, g_neg), (ref, ref_pos, ref_neg) = both_paths(pos, neg, margin=0.1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(g_pos, ref_pos, atol=atol, rtol=max(rtol, 1e-4))
    torch.testing.assert_close(g_neg, ref_neg, atol=atol, rtol=max(rtol, 1e-4))
