"""Per-pixel class logits, sigmoid focal loss and dice loss, fused so the logits are never stored.

For B images with pixel embeddings pixels [B, P, D] (P = h * w), candidate class embeddings
classes [B, K, D] and labels [B, P], the logit of class k at pixel p is

    x[b, k, p] = logit_scale * <pixels[b, p], classes[b, k]> + bias

and its target t[b, k, p] is 1 where labels[b, p] == k, else 0. A pixel whose label is
`ignore_index` counts for nothing; any other label outside [0, K) (by convention -1) is
background: a negative for every candidate. Two scalar float32 losses come out:

    focal = sum over non-ignored (b, k, p) of sigmoid_focal(x, t) / (K * number of non-ignored pixels)
    dice  = mean over (b, k) of 1 - (2 * sum_p s * t + 1) / (sum_p s + sum_p t + 1),   s = sigmoid(x)

with the dice sums over non-ignored pixels. sigmoid_focal is torchvision's
(alpha * t + (1 - alpha) * (1 - t)) * BCE(x, t) * (1 - p_t) ** gamma, alpha < 0 meaning no
weighting. Both normalisations are Mask2Former's (focal `loss.mean(1).sum() / num_masks`,
dice `loss.sum() / num_masks`) with every (image, candidate) pair a mask, so num_masks = B * K;
the focal mean over pixels is taken over the whole batch's non-ignored pixels rather than image
by image. The two agree whenever images have equally many ignored pixels, and the batch-wide
mean stays defined when an image is entirely ignored (it then adds nothing to either sum, and
each of its K dice terms is 1 - 1/1 = 0). With no valid pixel at all, focal is 0.

`segmentation_losses` runs Triton kernels on [BLOCK_P, BLOCK_K] tiles of logits held in
registers: the forward writes only the focal sum and the three dice sums per (b, k) and P-tile,
the backward recomputes each tile's logits and turns them into the gradients for pixels and
classes. The [B, K, P] logits (80 MB in float32 for 8 images of 128x128 pixels and 150
candidates, per decoder layer) exist neither in the forward nor in the backward.
`segmentation_losses_reference` is the plain torch version that materialises them; it is what
runs on the CPU unless Triton is asked for.

Dots (precision.py): float32 IEEE for float32 inputs and interpreted; compiled with 16-bit inputs,
operands in that type (the backward's per-logit gradients rounded to it) and float32 sums.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

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

# Rows of the per-(b, k) partial sums the forward kernel writes.
_FOCAL, _SIG_T, _SIG, _T = range(4)


def _check_inputs(pixels: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> None:
    if pixels.ndim != 3 or classes.ndim != 3 or labels.ndim != 2:
        raise ValueError(f"expected pixels [B, P, D], classes [B, K, D], labels [B, P]; got "
                         f"{tuple(pixels.shape)}, {tuple(classes.shape)}, {tuple(labels.shape)}")
    b, p, d = pixels.shape
    if classes.shape[0] != b or classes.shape[2] != d or tuple(labels.shape) != (b, p):
        raise ValueError(f"pixels {tuple(pixels.shape)}, classes {tuple(classes.shape)} and labels "
                         f"{tuple(labels.shape)} disagree")
    if not pixels.is_floating_point() or not classes.is_floating_point():
        raise TypeError(f"pixels and classes must be floating point; got {pixels.dtype}, {classes.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if not (pixels.device == classes.device == labels.device):
        raise ValueError(f"pixels, classes and labels are on {pixels.device}, {classes.device}, {labels.device}")


def _finish(sums: torch.Tensor, n_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice) from the [B, 4, K] partial sums and the count of non-ignored pixels.

    Shared by both paths, so that they differ only in how the sums were accumulated.
    """
    b, _, k = sums.shape
    # clamp, not a Python max: keeps the count on the device, so a call never waits for the GPU.
    focal = sums[:, _FOCAL].sum() / (n_valid.clamp(min=1) * max(k, 1))
    dice = 1 - (2 * sums[:, _SIG_T] + 1) / (sums[:, _SIG] + sums[:, _T] + 1)
    return focal, dice.sum() / max(b * k, 1)


def segmentation_losses_reference(pixels: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, *,
                                  logit_scale: float, bias: float = 0.0, alpha: float = 0.25,
                                  gamma: float = 2.0, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice) as float32 scalars, in plain torch with the [B, K, P] logits materialised.

    Same arguments and definitions as `segmentation_losses`; differentiable by autograd.
    """
    _check_inputs(pixels, classes, labels)
    k = classes.shape[1]
    logits = torch.einsum("bpd,bkd->bkp", pixels.float(), classes.float()) * logit_scale + bias
    labels = labels.long()
    valid = (labels != ignore_index).unsqueeze(1)  # [B, 1, P]
    candidates = torch.arange(k, device=labels.device).view(1, k, 1)
    targets = ((labels.unsqueeze(1) == candidates) & valid).float()

    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    focal = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        focal = (alpha * targets + (1 - alpha) * (1 - targets)) * focal
    prob = prob * valid
    sums = torch.stack([(focal * valid).sum(-1), (prob * targets).sum(-1), prob.sum(-1), targets.sum(-1)], dim=1)
    return _finish(sums, valid.sum())


if triton is not None:

    @triton.jit
    def _logit_tile(pix_base, cls_base, p_offs, k_offs, P, K, D, scale, bias,
                    sp_p, sp_d, sc_k, sc_d,
                    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """[BLOCK_P, BLOCK_K] float32 logits of one image; rows and columns out of range are 0 + bias."""
        d_offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        # D need not be a power of two (CLIP widths are, projections need not be): chunks, the last masked.
        for d0 in range(0, D, BLOCK_D):
            d_valid = d0 + d_offs < D
            pb = tl.load(pix_base + p_offs[:, None] * sp_p + (d0 + d_offs)[None, :] * sp_d,
                         mask=(p_offs < P)[:, None] & d_valid[None, :], other=0.0)
            cb = tl.load(cls_base + k_offs[:, None] * sc_k + (d0 + d_offs)[None, :] * sc_d,
                         mask=(k_offs < K)[:, None] & d_valid[None, :], other=0.0)
            # The inputs' own values in every DOT mode, so the products are exact and only the
            # float32 sums' order differs from the reference.
            acc = dot_acc(pb, tl.trans(cb), acc, DOT)
        return acc * scale + bias

    @triton.jit
    def _focal_terms(x, positive, a_pos, a_neg, gamma):
        """Focal loss, its derivative in x, sigmoid(x) and sigmoid(x) * (1 - sigmoid(x)), elementwise.

        With z the logit of the wrong answer (z = x for a negative, -x for a positive),
        BCE = softplus(z), 1 - p_t = sigmoid(z) and (1 - p_t) ** gamma = exp(-gamma * softplus(-z)).
        Written this way nothing overflows, 1 - p_t does not cancel, and gamma = 0 needs no case.
        """
        z = tl.where(positive, -x, x)
        tail = tl.log(1 + tl.exp(-tl.abs(z)))
        sp_z = tl.maximum(z, 0.0) + tail       # softplus(z)  = -log(p_t)
        sp_mz = tl.maximum(-z, 0.0) + tail     # softplus(-z) = -log(1 - p_t)
        sig_z = tl.exp(-sp_mz)                 # 1 - p_t
        sig_mz = tl.exp(-sp_z)                 # p_t
        weight = tl.where(positive, a_pos, a_neg)
        modulator = tl.exp(-gamma * sp_mz)
        focal = weight * sp_z * modulator
        # d/dz [softplus(z) * sigmoid(z) ** gamma]
        #     = sigmoid(z) ** gamma * (sigmoid(z) + gamma * softplus(z) * sigmoid(-z))
        d_focal = weight * modulator * (sig_z + gamma * sp_z * sig_mz)
        d_focal = tl.where(positive, -d_focal, d_focal)
        prob = tl.where(positive, sig_mz, sig_z)
        return focal, d_focal, prob, sig_z * sig_mz

    @triton.jit
    def _targets(lab_ptr, b, p_offs, k_offs, P, K, ignore_index, sl_b, sl_p):
        """Masks of one tile: non-ignored (b, k, p) in range, and positives among them."""
        lab = tl.load(lab_ptr + b * sl_b + p_offs * sl_p, mask=p_offs < P, other=ignore_index)
        valid = (lab != ignore_index)[:, None] & (k_offs < K)[None, :]
        positive = (lab[:, None] == k_offs[None, :]) & valid
        return valid, positive

    @triton.jit
    def _seg_loss_fwd_kernel(
        pix_ptr, cls_ptr, lab_ptr, part_ptr,
        P, K, D,
        scale, bias, a_pos, a_neg, gamma, ignore_index,
        sp_b, sp_p, sp_d,
        sc_b, sc_k, sc_d,
        sl_b, sl_p,
        so_b, so_t, so_s, so_k,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    ):
        # One program: BLOCK_P pixels x BLOCK_K candidates of one image. It writes its own slot of
        # the partial sums rather than adding atomically, so the result does not depend on timing.
        tile = tl.program_id(0)
        k_block = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        p_offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        k_offs = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        x = _logit_tile(pix_ptr + b * sp_b, cls_ptr + b * sc_b, p_offs, k_offs, P, K, D, scale, bias,
                        sp_p, sp_d, sc_k, sc_d, BLOCK_P, BLOCK_K, BLOCK_D, DOT)
        valid, positive = _targets(lab_ptr, b, p_offs, k_offs, P, K, ignore_index, sl_b, sl_p)
        focal, _, prob, _ = _focal_terms(x, positive, a_pos, a_neg, gamma)
        prob = tl.where(valid, prob, 0.0)
        t = positive.to(tl.float32)

        out = part_ptr + b * so_b + tile * so_t + k_offs * so_k
        k_valid = k_offs < K
        tl.store(out + 0 * so_s, tl.sum(tl.where(valid, focal, 0.0), axis=0), mask=k_valid)
        tl.store(out + 1 * so_s, tl.sum(prob * t, axis=0), mask=k_valid)
        tl.store(out + 2 * so_s, tl.sum(prob, axis=0), mask=k_valid)
        tl.store(out + 3 * so_s, tl.sum(t, axis=0), mask=k_valid)

    @triton.jit
    def _grad_logit_tile(pix_ptr, cls_ptr, lab_ptr, coef_ptr, dice_ptr, b, p_offs, k_offs,
                         P, K, D, scale, bias, a_pos, a_neg, gamma, ignore_index,
                         sp_b, sp_p, sp_d, sc_b, sc_k, sc_d, sl_b, sl_p, sd_b, sd_s,
                         BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """d(loss)/d(<pixel, class>) of one tile, from recomputed logits; 0 outside the valid entries.

        coef_ptr holds d(loss)/d(focal sum); dice_ptr [B, 2, K] holds u and v with
        d(loss)/d(sigmoid(x)) = u - v * t (the dice quotient's derivative, already scaled).
        """
        x = _logit_tile(pix_ptr + b * sp_b, cls_ptr + b * sc_b, p_offs, k_offs, P, K, D, scale, bias,
                        sp_p, sp_d, sc_k, sc_d, BLOCK_P, BLOCK_K, BLOCK_D, DOT)
        valid, positive = _targets(lab_ptr, b, p_offs, k_offs, P, K, ignore_index, sl_b, sl_p)
        _, d_focal, _, d_prob = _focal_terms(x, positive, a_pos, a_neg, gamma)
        k_valid = k_offs < K
        u = tl.load(dice_ptr + b * sd_b + k_offs, mask=k_valid, other=0.0)
        v = tl.load(dice_ptr + b * sd_b + sd_s + k_offs, mask=k_valid, other=0.0)
        coef = tl.load(coef_ptr)
        g = coef * d_focal + (u[None, :] - v[None, :] * positive.to(tl.float32)) * d_prob
        return tl.where(valid, g * scale, 0.0)

    @triton.jit
    def _grad_operand(g, DOT: tl.constexpr):
        """A tile of per-logit gradients as a dot operand, and the factor its products take.

        With 16-bit operands the tile is divided by its largest magnitude before it is rounded:
        the gradients are about 1 / (K * valid pixels) each (1e-7 for 8 images of 128x128 and
        150 candidates), where float16 has no normal numbers left. bfloat16, with float32's
        range, takes the same path.
        """
        if DOT == "ieee":
            return g, 1.0
        else:
            peak = tl.max(tl.max(tl.abs(g), axis=1), axis=0)
            peak = tl.where(peak > 0, peak, 1.0)
            return g * (1.0 / peak), peak

    @triton.jit
    def _seg_loss_grad_pixels_kernel(
        pix_ptr, cls_ptr, lab_ptr, coef_ptr, dice_ptr, grad_ptr,
        P, K, D,
        scale, bias, a_pos, a_neg, gamma, ignore_index,
        sp_b, sp_p, sp_d,
        sc_b, sc_k, sc_d,
        sl_b, sl_p,
        sd_b, sd_s,
        sg_b, sg_p, sg_d,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
        ONE_K_BLOCK: tl.constexpr,
    ):
        # One program: BLOCK_P pixels of one image, all candidates. grad[p] = sum_k g[p, k] * classes[k]
        # is written chunk by chunk of D: a [BLOCK_P, D] accumulator would not fit in registers for
        # D = 512 or 768. With ONE_K_BLOCK (K <= BLOCK_K, up to 128 candidates) the tile's logits
        # are computed once and each chunk is stored once; with more candidates, each block of
        # them adds its share into the program's own rows of the output.
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        p_offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        d_offs = tl.arange(0, BLOCK_D)
        p_valid = p_offs < P
        for k0 in range(0, K, BLOCK_K):
            k_offs = k0 + tl.arange(0, BLOCK_K)
            g = _grad_logit_tile(pix_ptr, cls_ptr, lab_ptr, coef_ptr, dice_ptr, b, p_offs, k_offs,
                                 P, K, D, scale, bias, a_pos, a_neg, gamma, ignore_index,
                                 sp_b, sp_p, sp_d, sc_b, sc_k, sc_d, sl_b, sl_p, sd_b, sd_s,
                                 BLOCK_P, BLOCK_K, BLOCK_D, DOT)
            g, g_scale = _grad_operand(g, DOT)
            for d0 in range(0, D, BLOCK_D):
                d_valid = d0 + d_offs < D
                cb = tl.load(cls_ptr + b * sc_b + k_offs[:, None] * sc_k + (d0 + d_offs)[None, :] * sc_d,
                             mask=(k_offs < K)[:, None] & d_valid[None, :], other=0.0)
                ptrs = grad_ptr + b * sg_b + p_offs[:, None] * sg_p + (d0 + d_offs)[None, :] * sg_d
                mask = p_valid[:, None] & d_valid[None, :]
                part = dot_acc(g, cb, tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32), DOT) * g_scale
                if ONE_K_BLOCK:
                    tl.store(ptrs, part, mask=mask)
                else:
                    # The first candidate block starts the sum, so the output needs no zeroing.
                    tl.store(ptrs, part + tl.load(ptrs, mask=mask & (k0 > 0), other=0.0), mask=mask)

    @triton.jit
    def _seg_loss_grad_classes_kernel(
        pix_ptr, cls_ptr, lab_ptr, coef_ptr, dice_ptr, grad_ptr,
        P, K, D, n_tiles, n_splits,
        scale, bias, a_pos, a_neg, gamma, ignore_index,
        sp_b, sp_p, sp_d,
        sc_b, sc_k, sc_d,
        sl_b, sl_p,
        sd_b, sd_s,
        sg_s, sg_b, sg_k, sg_d,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    ):
        # One program: BLOCK_K candidates of one image, every n_splits-th pixel tile. Its sum
        # over those tiles of g.T @ pixels goes to its own split of the output, which torch adds
        # up: P is long and K often short, so splitting P keeps the GPU busy without atomics,
        # and the sum does not depend on timing.
        k_block = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        k_offs = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        d_offs = tl.arange(0, BLOCK_D)
        k_valid = k_offs < K
        for tile in range(split, n_tiles, n_splits):
            p_offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
            g = _grad_logit_tile(pix_ptr, cls_ptr, lab_ptr, coef_ptr, dice_ptr, b, p_offs, k_offs,
                                 P, K, D, scale, bias, a_pos, a_neg, gamma, ignore_index,
                                 sp_b, sp_p, sp_d, sc_b, sc_k, sc_d, sl_b, sl_p, sd_b, sd_s,
                                 BLOCK_P, BLOCK_K, BLOCK_D, DOT)
            g, g_scale = _grad_operand(g, DOT)
            g = tl.trans(g)
            for d0 in range(0, D, BLOCK_D):
                d_valid = d0 + d_offs < D
                pb = tl.load(pix_ptr + b * sp_b + p_offs[:, None] * sp_p + (d0 + d_offs)[None, :] * sp_d,
                             mask=(p_offs < P)[:, None] & d_valid[None, :], other=0.0)
                ptrs = grad_ptr + split * sg_s + b * sg_b + k_offs[:, None] * sg_k + (d0 + d_offs)[None, :] * sg_d
                mask = k_valid[:, None] & d_valid[None, :]
                part = dot_acc(g, pb, tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32), DOT) * g_scale
                # The split's first tile starts its sum, so the output needs no zeroing.
                tl.store(ptrs, part + tl.load(ptrs, mask=mask & (tile > split), other=0.0), mask=mask)


def _blocks(k: int, d: int, compiled: bool, dot: str) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_D, num_warps); tl.dot wants every dimension >= 16.

    One block of candidates covers up to 128 of them: for most vocabularies a tile's logits are
    then computed once per kernel, the pixel rows read once per tile, and the pixel gradient's
    rows written once rather than added to block after block through memory.
    """
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    if compiled:
        # [64, 128] float32 logits and their elementwise terms take 32 registers a thread each at
        # 8 warps. The chunks of D are the widest that ptxas fits in 255 registers a thread
        # without spilling (sm_90): 32 for 16-bit operands, 16 for IEEE products (their float32
        # operands sit in registers).
        return 64, block_k, 16 if dot == IEEE else 32, 8
    # The interpreter's cost is per program and per op, nearly not per element: few, larger tiles.
    return 64, block_k, max(16, min(64, triton.next_power_of_2(d))), 4


# The class-gradient kernel's partial sums, [splits, B, K, D] float32, stay within this: a quarter
# of the pixel gradient of 8 images of 128x128 at D = 512, and freed once torch has added them up.
_CLASS_PARTIAL_BYTES = 64 << 20


def _class_splits(b: int, k_blocks: int, p_tiles: int, k: int, d: int, sm_count: int) -> int:
    """How many pixel ranges the class-gradient kernel splits each image into.

    Its grid is (k-blocks, splits, B): B * k_blocks programs per split, 8 for a batch of 8 with
    up to 128 candidates, on a GPU of 132 SMs. Aim at 4 programs per SM, split no finer than
    one pixel tile per program, and keep the partial sums within _CLASS_PARTIAL_BYTES. The
    interpreter counts as one SM: a few splits, so that the split sums are exercised where the
    tests run.
    """
    per_split = b * k_blocks
    if per_split == 0:
        return 1
    wanted = -(-4 * sm_count // per_split)
    budget = max(1, _CLASS_PARTIAL_BYTES // max(b * k * d * 4, 1))
    return max(1, min(wanted, p_tiles, budget))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or _INTERPRETED:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class _SegmentationLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, classes, labels, scale, bias, alpha, gamma, ignore_index):
        b, p, d = pixels.shape
        k = classes.shape[1]
        a_pos, a_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
        # Chosen here, at launch: the same kernels compile for each mode.
        dot = dot_precision(torch.promote_types(pixels.dtype, classes.dtype), _INTERPRETED)
        compiled = pixels.device.type == "cuda" and not _INTERPRETED
        block_p, block_k, block_d, warps = _blocks(k, d, compiled, dot)
        p_tiles = triton.cdiv(p, block_p)
        partial = torch.empty((b, p_tiles, 4, k), dtype=torch.float32, device=pixels.device)
        if partial.numel():
            _seg_loss_fwd_kernel[(p_tiles, triton.cdiv(k, block_k), b)](
                pixels, classes, labels, partial,
                p, k, d,
                scale, bias, a_pos, a_neg, gamma, ignore_index,
                *pixels.stride(), *classes.stride(), *labels.stride(), *partial.stride(),
                BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_D=block_d, DOT=dot, num_warps=warps,
            )
        sums = partial.sum(dim=1)
        n_valid = (labels != ignore_index).sum()
        focal, dice = _finish(sums, n_valid)
        ctx.save_for_backward(pixels, classes, labels, sums, n_valid)
        ctx.args = (scale, bias, a_pos, a_neg, gamma, ignore_index, (block_p, block_k, block_d), dot, warps)
        return focal, dice

    @staticmethod
    def backward(ctx, grad_focal, grad_dice):
        pixels, classes, labels, sums, n_valid = ctx.saved_tensors
        scale, bias, a_pos, a_neg, gamma, ignore_index, (block_p, block_k, block_d), dot, warps = ctx.args
        b, p, d = pixels.shape
        k = classes.shape[1]
        need_pixels, need_classes = ctx.needs_input_grad[:2]
        grad_pixels = grad_classes = None
        if not (need_pixels or need_classes):
            return (None,) * 8

        # The chain rule up to sigmoid(x), in torch on [B, K] numbers: every tile needs the same
        # per-(b, k) dice factors, and the upstream gradients stay on the device.
        coef = (grad_focal.float() / (n_valid.clamp(min=1) * max(k, 1))).reshape(1)
        numer = 2 * sums[:, _SIG_T] + 1
        denom = sums[:, _SIG] + sums[:, _T] + 1
        per_mask = grad_dice.float() / max(b * k, 1)
        # d(1 - numer / denom)/d(sigmoid x) = numer / denom**2 - 2 t / denom
        dice = torch.stack([per_mask * numer / denom**2, per_mask * 2 / denom], dim=1).contiguous()

        shared = (p, k, d, scale, bias, a_pos, a_neg, gamma, ignore_index)
        strides = (*pixels.stride(), *classes.stride(), *labels.stride(), *dice.stride()[:2])
        blocks = dict(BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_D=block_d, DOT=dot, num_warps=warps)
        p_tiles, k_blocks = triton.cdiv(p, block_p), triton.cdiv(k, block_k)
        if need_pixels:
            grad = torch.empty((b, p, d), dtype=torch.float32, device=pixels.device)
            if k == 0:
                grad.zero_()
            elif grad.numel():
                _seg_loss_grad_pixels_kernel[(p_tiles, b)](
                    pixels, classes, labels, coef, dice, grad, *shared, *strides, *grad.stride(),
                    ONE_K_BLOCK=k_blocks == 1, **blocks)
            grad_pixels = grad.to(pixels.dtype)
        if need_classes:
            splits = _class_splits(b, k_blocks, p_tiles, k, d, _sm_count(pixels.device))
            grad = torch.empty((splits, b, k, d), dtype=torch.float32, device=pixels.device)
            if p == 0:
                grad.zero_()
            elif grad.numel():
                _seg_loss_grad_classes_kernel[(k_blocks, splits, b)](
                    pixels, classes, labels, coef, dice, grad, p, k, d, p_tiles, splits, *shared[3:],
                    *strides, *grad.stride(), **blocks)
            grad_classes = grad.sum(dim=0).to(classes.dtype)
        return grad_pixels, grad_classes, None, None, None, None, None, None


def _use_triton(use_triton: bool | None, device: torch.device) -> bool:
    if use_triton is None:
        return triton is not None and device.type == "cuda"
    if use_triton:
        if triton is None:
            raise RuntimeError("Triton is not installed; pass use_triton=False")
        if device.type != "cuda" and not _INTERPRETED:
            raise RuntimeError("the Triton kernels need CUDA tensors, "
                               "or TRITON_INTERPRET=1 set before this module is imported")
    return bool(use_triton)


def segmentation_losses(pixels: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, *,
                        logit_scale: float, bias: float = 0.0, alpha: float = 0.25, gamma: float = 2.0,
                        ignore_index: int = 255, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice): float32 scalar losses of per-pixel class logits, differentiable in pixels and classes.

    pixels [B, P, D] and classes [B, K, D] may be float32, float16 or bfloat16, with any strides;
    arithmetic is float32 (compiled with 16-bit inputs, the backward multiplies its per-logit
    gradients rounded to their type: see the module docstring) and the gradients come back in
    the inputs' dtypes. labels [B, P] hold a candidate index in [0, K), `ignore_index` for
    pixels that count for nothing, and anything else (-1 by convention) for background. logits = logit_scale * <pixel, class> + bias, with
    logit_scale and bias constants (no gradient flows to them); the losses and their
    normalisation are described in the module docstring. alpha < 0 turns off the focal class
    weighting, as in torchvision.

    use_triton: None runs the fused Triton kernels on CUDA tensors and the torch reference
    otherwise; True forces the kernels (on the CPU only under TRITON_INTERPRET=1); False forces
    the reference.

    Meant to be called once per decoder layer with the same labels: the Triton path makes no
    host-device synchronisation, keeps nothing of size B * K * P, and converts labels to int32
    only when they are not int32 already (pass them so to skip that copy on every layer).
    """
    _check_inputs(pixels, classes, labels)
    if not _use_triton(use_triton, pixels.device):
        return segmentation_losses_reference(pixels, classes, labels, logit_scale=logit_scale, bias=bias,
                                             alpha=alpha, gamma=gamma, ignore_index=ignore_index)
    labels = labels.to(torch.int32)
    return _SegmentationLosses.apply(pixels, classes, labels, float(logit_scale), float(bias), float(alpha),
                                     float(gamma), int(ignore_index))
