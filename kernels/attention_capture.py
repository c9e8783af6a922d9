"""Cross-attention probability of each class's tokens, per image position, averaged over heads.

For R batch rows with queries q [R, H, N, D] (N image positions of one UNet layer) and keys
k [R, H, L, D] (L text tokens), the map of class c in row r is

    sum over t in token_index[r, c]  of  mean over h  of  softmax_L(q[r, h] @ k[r, h].T * scale)[:, t]

`class_attention` computes it with a Triton kernel that keeps each block's [BLOCK_N, L] logits in
registers: the full [R, H, N, L] probability tensor (tens of MB per layer for SD at 64x64
latents) is never written to memory. `class_attention_reference` is the plain torch version it
is tested against.

Dots (precision.py): float32 IEEE for float32 inputs and interpreted; compiled with 16-bit inputs,
q and k as they are and the probabilities as float16, with float32 sums.
"""

from __future__ import annotations

import os

import torch

from magicseg_engine.kernels.precision import IEEE, dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton; the reference still works.
    triton = None
else:
    from magicseg_engine.kernels.precision import dot_acc

# Read once, like Triton itself: the interpreter is chosen when a kernel is decorated.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def class_attention_reference(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """[R, C, N] float32: softmax over the L keys, summed over each class's token positions, mean over heads.

    Positions of -1 in `token_index` [R, C, T] are padding; a class with none valid maps to 0.
    """
    _check_shapes(q, k, token_index)
    r, _, n, _ = q.shape
    c, t = token_index.shape[1:]
    probs = torch.softmax(torch.einsum("rhnd,rhld->rhnl", q.float(), k.float()) * scale, dim=-1).mean(dim=1)
    valid = token_index >= 0
    columns = token_index.clamp(min=0).long().reshape(r, 1, c * t).expand(r, n, c * t)
    picked = torch.gather(probs, 2, columns) * valid.reshape(r, 1, c * t)
    return picked.reshape(r, n, c, t).sum(dim=-1).permute(0, 2, 1).contiguous()


def class_attention_layers(queries: list[torch.Tensor], keys: list[torch.Tensor], token_index: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """[R, C, N] float32: `class_attention_reference` summed over layers of one size, computed
    together, where the queries' R rows are one or more groups of the keys' B rows.

    `queries[i]` [R, H, N, D] and `keys[i]` [B, H, L, D] are one layer's; row r's queries meet
    the keys of row r mod B (the negatives' queries are read against the positive prompts' keys
    without copying those keys), and `token_index` [B, C, T] is the keys' rows'. The torch path
    for the CPU: one stacked product and one softmax per step instead of a dozen small
    operations per layer. On the CPU small operations cost more than the arithmetic: a
    log-sum-exp normaliser with only the class columns exponentiated took more time than the
    one fused softmax (capture overhead 7.4% against 5.4% of a tiny denoising step).
    """
    q = torch.stack(queries).float() if len(queries) > 1 else queries[0].float().unsqueeze(0)
    k = torch.stack(keys).float() if len(keys) > 1 else keys[0].float().unsqueeze(0)
    layers, r, h, n, d = q.shape
    b = k.shape[1]
    if r % b or token_index.shape[0] != b:
        raise ValueError(f"{r} query rows are not groups of the keys' {b} rows and index {tuple(token_index.shape)}")
    c, t = token_index.shape[1:]
    logits = torch.matmul(q.reshape(layers, r // b, b, h, n, d), k.unsqueeze(1).transpose(-1, -2))
    probs = torch.softmax(logits.mul_(scale), dim=-1)  # [layers, R/B, B, H, N, L]
    columns = token_index.clamp(min=0).long().view(1, 1, b, 1, 1, c * t).expand(layers, r // b, b, h, n, c * t)
    probs = torch.gather(probs, -1, columns).sum(dim=(0, 3))  # [R/B, B, N, C*T]
    probs = probs.mul_((token_index >= 0).view(1, b, 1, c * t).to(probs.dtype) / h)
    return probs.view(r // b, b, n, c, t).sum(-1).transpose(-1, -2).reshape(r, c, n)


if triton is not None:

    @triton.jit
    def _class_attention_kernel(
        q_ptr, k_ptr, idx_ptr, out_ptr,
        N, L, D, H, C, T,
        scale, weight,
        sq_r, sq_h, sq_n, sq_d,
        sk_r, sk_h, sk_l, sk_d,
        si_r, si_c, si_t,
        so_r, so_c, so_n,
        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        ACCUMULATE: tl.constexpr, DOT: tl.constexpr,
    ):
        # One program: BLOCK_N positions of one row, all heads.
        block = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        n_offs = block * BLOCK_N + tl.arange(0, BLOCK_N)
        l_offs = tl.arange(0, BLOCK_L)
        d_offs = tl.arange(0, BLOCK_D)
        c_offs = tl.arange(0, BLOCK_C)
        n_valid = n_offs < N
        l_valid = l_offs < L

        # The class gather as a [BLOCK_L, BLOCK_C] count matrix, so that one small matmul per head
        # picks and sums the class columns. Padding (-1) and padded classes match no key.
        select = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for t in range(T):
            pos = tl.load(idx_ptr + row * si_r + c_offs * si_c + t * si_t, mask=c_offs < C, other=-1)
            select += (l_offs[:, None] == pos[None, :]).to(tl.float32)

        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for h in range(H):
            q_base = q_ptr + row * sq_r + h * sq_h
            k_base = k_ptr + row * sk_r + h * sk_h
            logits = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
            # D need not be a power of two (SD's 40, 80, 160): chunks, the last one masked.
            for d0 in range(0, D, BLOCK_D):
                d_valid = d0 + d_offs < D
                qb = tl.load(q_base + n_offs[:, None] * sq_n + (d0 + d_offs)[None, :] * sq_d,
                             mask=n_valid[:, None] & d_valid[None, :], other=0.0)
                kb = tl.load(k_base + l_offs[:, None] * sk_l + (d0 + d_offs)[None, :] * sk_d,
                             mask=l_valid[:, None] & d_valid[None, :], other=0.0)
                # q and k as they come, in every DOT mode: the products are exact and only the
                # float32 sums' order differs from the reference. The matmul is [BLOCK_N, D] x
                # [D, L], small next to the layer's own attention.
                logits = dot_acc(qb, tl.trans(kb), logits, DOT)
            logits = tl.where(l_valid[None, :], logits * scale, float("-inf"))
            peak = tl.max(logits, axis=1)
            p = tl.exp(logits - peak[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            if DOT == "ieee":
                acc = dot_acc(p, select, acc, DOT)
            else:
                # Probabilities lie in [0, 1], where float16 keeps 3 more bits than bfloat16
                # (relative error at most 2**-11, absolute 2**-25 below 2**-14); the token counts in
                # `select` are small integers, exact in either.
                acc = dot_acc(p, select, acc, "fp16")

        result = acc * (weight / H)
        out_ptrs = out_ptr + row * so_r + c_offs[None, :] * so_c + n_offs[:, None] * so_n
        out_mask = n_valid[:, None] & (c_offs[None, :] < C)
        if ACCUMULATE:
            result += tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, result, mask=out_mask)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or token_index.ndim != 3:
        raise ValueError(f"expected q [R, H, N, D], k [R, H, L, D], token_index [R, C, T]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(token_index.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or token_index.shape[0] != q.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and token_index {tuple(token_index.shape)} disagree")


def class_attention(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """The Triton version of `class_attention_reference`, times `weight`, added into `out` when given.

    q and k may be float16, bfloat16 or float32 and any strides (the UNet's head-split views
    are passed without copies); arithmetic is float32, but for the probabilities, which a
    compiled kernel with 16-bit inputs rounds to float16 before their class sums. `out` must be
    a float32 [R, C, N] tensor; it is updated in place and returned, so a caller accumulates
    over layers and steps without temporaries. Token positions must lie in [-1, L).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use class_attention_reference")
    _check_shapes(q, k, token_index)
    r, h, n, d = q.shape
    length = k.shape[2]
    c, t = token_index.shape[1:]
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("the Triton kernel needs CUDA tensors, "
                           "or TRITON_INTERPRET=1 set before this module is imported")
    if out is None:
        out = torch.empty((r, c, n), dtype=torch.float32, device=q.device)
        accumulate = False
    else:
        if out.shape != (r, c, n) or out.dtype != torch.float32 or out.device != q.device:
            raise ValueError(f"out must be float32 {(r, c, n)} on {q.device}; "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        accumulate = True
    if r == 0 or c == 0 or n == 0:
        return out if accumulate else out.zero_()
    token_index = token_index.to(device=q.device, dtype=torch.int32)
    # tl.dot wants every dimension >= 16.
    block_l = max(16, triton.next_power_of_2(length))
    # Chosen here, at launch: the same kernel compiles for each mode.
    dot = dot_precision(torch.promote_types(q.dtype, k.dtype), _INTERPRETED)
    compiled = q.device.type == "cuda" and not _INTERPRETED
    # IEEE products hold their float32 operands in registers: compiled, chunks of 16 keep them
    # from spilling (ptxas, sm_90, 8 warps); 16-bit operands fit chunks of 64.
    block_d = max(16, min(16 if compiled and dot == IEEE else 64, triton.next_power_of_2(d)))
    block_c = max(16, triton.next_power_of_2(c))
    # The [BLOCK_N, BLOCK_L] logits dominate registers; 77 tokens pad to 128.
    block_n = 64 if block_l <= 128 else 32
    grid = (triton.cdiv(n, block_n), r)
    _class_attention_kernel[grid](
        q, k, token_index, out,
        n, length, d, h, c, t,
        float(scale), float(weight),
        *q.stride(), *k.stride(), *token_index.stride(), *out.stride(),
        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_C=block_c,
        ACCUMULATE=accumulate, DOT=dot,
        # 4 warps spill the [64, 128] logits and their exponentials; 8 do not.
        num_warps=8 if compiled else 4,
    )
    return out
