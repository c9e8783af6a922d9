"""Counterfactual hinge: how far each positive embedding's cosine with its negative exceeds a margin.

For rows g_pos[b] and g_neg[b] of two [B, D] tensors,

    loss = mean over b of max(0, cos(g_pos[b], g_neg[b]) - margin),
    cos(u, v) = <u, v> / (max(|u|, eps) * max(|v|, eps))

(the cosine as torch.nn.functional.cosine_similarity defines it, eps included; margin 0 gives
max(0, cos)). A row whose cosine is not above the margin - a zero vector among them, when the
margin is 0 - contributes neither loss nor gradient.

`counterfactual_loss` computes it with two Triton kernels over blocks of rows: the forward
reduces each pair to its dot product and two norms, in float32 whatever the inputs' dtype, and
keeps those three numbers per row; the backward turns them into the gradient in one pass over D.
`counterfactual_loss_reference` is the plain torch version it is tested against, and what runs
on the CPU unless Triton is asked for.

Dots: none (no tl.dot); row reductions of float32 products in float32, whatever the inputs' dtype.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton; the reference still works.
    triton = None

# Read once, like Triton itself: the interpreter is chosen when a kernel is decorated.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

EPS = 1e-8  # torch.nn.functional.cosine_similarity's


def _check_inputs(g_pos: torch.Tensor, g_neg: torch.Tensor) -> None:
    if g_pos.ndim != 2 or g_pos.shape != g_neg.shape:
        raise ValueError(f"expected g_pos and g_neg of one shape [B, D]; "
                         f"got {tuple(g_pos.shape)}, {tuple(g_neg.shape)}")
    if not g_pos.is_floating_point() or not g_neg.is_floating_point():
        raise TypeError(f"g_pos and g_neg must be floating point; got {g_pos.dtype}, {g_neg.dtype}")
    if g_pos.device != g_neg.device:
        raise ValueError(f"g_pos is on {g_pos.device}, g_neg on {g_neg.device}")


def counterfactual_loss_reference(g_pos: torch.Tensor, g_neg: torch.Tensor, *, margin: float = 0.0,
                                  eps: float = EPS) -> torch.Tensor:
    """float32 scalar: mean over rows of max(0, cos(g_pos[b], g_neg[b]) - margin), in plain torch."""
    _check_inputs(g_pos, g_neg)
    pos, neg = g_pos.float(), g_neg.float()
    # vector_norm's gradient at a zero vector is 0, not NaN, so zero rows stay harmless.
    norms = torch.linalg.vector_norm(pos, dim=1).clamp(min=eps) * torch.linalg.vector_norm(neg, dim=1).clamp(min=eps)
    cos = (pos * neg).sum(dim=1) / norms
    # relu, whose gradient at 0 is 0: a row exactly at the margin is not pushed.
    return torch.relu(cos - margin).sum() / max(pos.shape[0], 1)


if triton is not None:

    @triton.jit
    def _counterfactual_fwd_kernel(
        pos_ptr, neg_ptr, loss_ptr, stats_ptr,
        B, D, margin, eps,
        sp_b, sp_d, sn_b, sn_d,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program: BLOCK_B rows, D in chunks. Writes each row's hinge and (dot, |pos|, |neg|).
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_valid = rows < B
        rows = rows.to(tl.int64)
        d_offs = tl.arange(0, BLOCK_D)
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        pos_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        neg_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_valid[:, None] & (d0 + d_offs < D)[None, :]
            cols = (d0 + d_offs)[None, :]
            u = tl.load(pos_ptr + rows[:, None] * sp_b + cols * sp_d, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(neg_ptr + rows[:, None] * sn_b + cols * sn_d, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(u * v, axis=1)
            pos_sq += tl.sum(u * u, axis=1)
            neg_sq += tl.sum(v * v, axis=1)
        pos_norm = tl.sqrt(pos_sq)
        neg_norm = tl.sqrt(neg_sq)
        cos = dot / (tl.maximum(pos_norm, eps) * tl.maximum(neg_norm, eps))
        tl.store(loss_ptr + rows, tl.maximum(cos - margin, 0.0), mask=row_valid)
        tl.store(stats_ptr + rows * 3 + 0, dot, mask=row_valid)
        tl.store(stats_ptr + rows * 3 + 1, pos_norm, mask=row_valid)
        tl.store(stats_ptr + rows * 3 + 2, neg_norm, mask=row_valid)

    @triton.jit
    def _counterfactual_bwd_kernel(
        pos_ptr, neg_ptr, stats_ptr, grad_ptr, gpos_ptr, gneg_ptr,
        B, D, margin, eps, inv_rows,
        sp_b, sp_d, sn_b, sn_d,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # With a = max(|u|, eps), c = max(|v|, eps) and cos = <u, v> / (a c):
        #   d cos / du = v / (a c) - cos * u / a**2, the second term only where |u| > eps
        # (below it the denominator is the constant eps), and symmetrically for v.
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_valid = rows < B
        rows = rows.to(tl.int64)
        d_offs = tl.arange(0, BLOCK_D)
        dot = tl.load(stats_ptr + rows * 3 + 0, mask=row_valid, other=0.0)
        pos_norm = tl.load(stats_ptr + rows * 3 + 1, mask=row_valid, other=0.0)
        neg_norm = tl.load(stats_ptr + rows * 3 + 2, mask=row_valid, other=0.0)
        a = tl.maximum(pos_norm, eps)
        c = tl.maximum(neg_norm, eps)
        cos = dot / (a * c)
        # Inactive rows (cos <= margin) get an exact zero: the upstream factor is 0 there.
        upstream = tl.load(grad_ptr) * inv_rows
        coef = tl.where(cos > margin, upstream, 0.0)
        cross = coef / (a * c)
        self_pos = tl.where(pos_norm > eps, coef * cos / (a * a), 0.0)
        self_neg = tl.where(neg_norm > eps, coef * cos / (c * c), 0.0)
        for d0 in range(0, D, BLOCK_D):
            mask = row_valid[:, None] & (d0 + d_offs < D)[None, :]
            cols = (d0 + d_offs)[None, :]
            u = tl.load(pos_ptr + rows[:, None] * sp_b + cols * sp_d, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(neg_ptr + rows[:, None] * sn_b + cols * sn_d, mask=mask, other=0.0).to(tl.float32)
            out = rows[:, None] * D + cols
            tl.store(gpos_ptr + out, cross[:, None] * v - self_pos[:, None] * u, mask=mask)
            tl.store(gneg_ptr + out, cross[:, None] * u - self_neg[:, None] * v, mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D): a [16, <=256] float32 tile per operand; D is looped over in chunks."""
    return 16, max(16, min(256, triton.next_power_of_2(d)))


class _CounterfactualLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g_pos, g_neg, margin, eps):
        rows, d = g_pos.shape
        block_b, block_d = _blocks(d)
        losses = torch.empty(rows, dtype=torch.float32, device=g_pos.device)
        stats = torch.empty((rows, 3), dtype=torch.float32, device=g_pos.device)
        if rows:
            _counterfactual_fwd_kernel[(triton.cdiv(rows, block_b),)](
                g_pos, g_neg, losses, stats, rows, d, margin, eps,
                *g_pos.stride(), *g_neg.stride(), BLOCK_B=block_b, BLOCK_D=block_d)
        ctx.save_for_backward(g_pos, g_neg, stats)
        ctx.args = (margin, eps)
        return losses.sum() / max(rows, 1)

    @staticmethod
    def backward(ctx, grad):
        g_pos, g_neg, stats = ctx.saved_tensors
        margin, eps = ctx.args
        rows, d = g_pos.shape
        block_b, block_d = _blocks(d)
        grad_pos = torch.empty((rows, d), dtype=torch.float32, device=g_pos.device)
        grad_neg = torch.empty_like(grad_pos)
        if grad_pos.numel():
            _counterfactual_bwd_kernel[(triton.cdiv(rows, block_b),)](
                g_pos, g_neg, stats, grad.float().reshape(1), grad_pos, grad_neg,
                rows, d, margin, eps, 1.0 / rows,
                *g_pos.stride(), *g_neg.stride(), BLOCK_B=block_b, BLOCK_D=block_d)
        return grad_pos.to(g_pos.dtype), grad_neg.to(g_neg.dtype), None, None


def counterfactual_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, *, margin: float = 0.0,
                        use_triton: bool | None = None) -> torch.Tensor:
    """float32 scalar: mean over b of max(0, cos(g_pos[b], g_neg[b]) - margin), differentiable in both.

    g_pos and g_neg are [B, D], float32, float16 or bfloat16, any strides; arithmetic is float32
    and the gradients come back in the inputs' dtypes. An empty batch gives 0.

    use_triton: None runs the Triton kernels on CUDA tensors and the torch reference otherwise;
    True forces the kernels (on the CPU only under TRITON_INTERPRET=1); False forces the reference.
    """
    _check_inputs(g_pos, g_neg)
    if use_triton is None:
        use_triton = triton is not None and g_pos.device.type == "cuda"
    elif use_triton:
        if triton is None:
            raise RuntimeError("Triton is not installed; pass use_triton=False")
        if g_pos.device.type != "cuda" and not _INTERPRETED:
            raise RuntimeError("the Triton kernels need CUDA tensors, "
                               "or TRITON_INTERPRET=1 set before this module is imported")
    if not use_triton:
        return counterfactual_loss_reference(g_pos, g_neg, margin=margin)
    return _CounterfactualLoss.apply(g_pos, g_neg, float(margin), EPS)
