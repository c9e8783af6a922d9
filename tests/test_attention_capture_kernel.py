"""The class-attention Triton kernel against its torch reference.

Tests that force the kernel take the `triton_device` fixture (conftest.py): compiled on a GPU
where one is visible, interpreted (TRITON_INTERPRET=1) on the CPU otherwise.
With IEEE float32 products (float32 inputs, and every input under the interpreter) both sides
compute in float32 from the same input values, so they differ only by summation order and exp
rounding: tolerances are atol 2e-6 / rtol 1e-5 on probabilities in [0, 1]. Compiled with 16-bit
inputs, the kernel rounds the probabilities to float16 before their class sums (relative error
at most 2**-11, so rtol 1e-3).
"""

import pytest
import torch

from launch_spy import LaunchSpy

from magicseg_engine.kernels import attention_capture
from magicseg_engine.kernels.attention_capture import class_attention, class_attention_reference
from magicseg_engine.kernels.precision import IEEE, dot_precision

ATOL, RTOL = 2e-6, 1e-5
RTOL_16_BIT_DOTS = 1e-3
L = 77  # CLIP's context length, as in Stable Diffusion


def tolerances(dtype) -> dict:
    """assert_close's atol and rtol for the kernel launched here on `dtype` inputs."""
    sixteen_bit = dot_precision(dtype, attention_capture._INTERPRETED) != IEEE
    return {"atol": ATOL, "rtol": RTOL_16_BIT_DOTS if sixteen_bit else RTOL}


def make_inputs(r, h, n, d, c, t, dtype=torch.float32, seed=0, device="cpu", length=L):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(r, h, n, d, generator=gen)
    k = torch.randn(r, h, length, d, generator=gen)
    # Ragged token lists: each class gets 0..t distinct positions, padding (-1) anywhere.
    index = torch.full((r, c, t), -1, dtype=torch.int32)
    for i in range(r):
        for j in range(c):
            count = int(torch.randint(0, t + 1, (1,), generator=gen))
            index[i, j, torch.randperm(t, generator=gen)[:count]] = torch.randperm(length, generator=gen)[:count].int()
    index[0, 0] = -1  # always one class with no tokens
    return q.to(device, dtype), k.to(device, dtype), index.to(device)


SHAPES = [
    # r, h, n, d, c, t
    (1, 1, 1, 40, 1, 1),
    (2, 8, 37, 40, 3, 4),
    (1, 4, 65, 64, 5, 8),
    (3, 2, 67, 80, 2, 3),
    (2, 5, 16, 64, 4, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "r{}h{}n{}d{}c{}t{}".format(*s))
def test_kernel_matches_reference(shape, dtype, triton_device):
    q, k, index = make_inputs(*shape, dtype=dtype, device=triton_device)
    scale = shape[3] ** -0.5
    got = class_attention(q, k, index, scale)
    want = class_attention_reference(q, k, index, scale)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[4], shape[2])
    torch.testing.assert_close(got, want, **tolerances(dtype))
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))  # the class with no tokens


def test_reference_is_a_probability_mass(triton_device):
    q, k, _ = make_inputs(2, 3, 10, 40, 1, 1, device=triton_device)
    everything = torch.arange(L, dtype=torch.int32, device=triton_device).expand(2, 1, L)
    for fn in (class_attention_reference, class_attention):
        torch.testing.assert_close(fn(q, k, everything, 0.2), torch.ones(2, 1, 10, device=triton_device),
                                   atol=ATOL, rtol=RTOL)
    # Two classes splitting the tokens share the mass.
    halves = torch.stack([torch.arange(0, 38), torch.arange(38, 76)]).int().expand(2, 2, 38).to(triton_device)
    split = class_attention(q, k, halves, 0.2)
    assert torch.all(split.sum(1) < 1) and torch.all(split > 0)


def test_strided_head_split_views_and_large_logits(triton_device):
    # The UNet hands over q as [B, N, H*D] viewed as [B, H, N, D]; no copy is made for the kernel.
    gen = torch.Generator().manual_seed(1)
    r, h, n, d = 2, 4, 23, 40
    q = (torch.randn(r, n, h * d, generator=gen) * 8).to(triton_device).view(r, n, h, d).transpose(1, 2)
    k = (torch.randn(r, L, h * d, generator=gen) * 8).to(triton_device).view(r, L, h, d).transpose(1, 2)
    assert not q.is_contiguous()
    index = torch.tensor([[[5, 6, -1], [-1, -1, 9]], [[1, -1, -1], [70, 71, 76]]], dtype=torch.int32,
                         device=triton_device)
    torch.testing.assert_close(class_attention(q, k, index, d**-0.5), class_attention_reference(q, k, index, d**-0.5),
                               atol=ATOL, rtol=RTOL)


def test_accumulates_into_out_with_weight(triton_device):
    q, k, index = make_inputs(2, 3, 31, 64, 3, 4, seed=3, device=triton_device)
    ref = class_attention_reference(q, k, index, 0.125)
    start = torch.rand(2, 3, 31).to(triton_device)
    out = start.clone()
    returned = class_attention(q, k, index, 0.125, out=out, weight=0.25)
    assert returned is out
    torch.testing.assert_close(out, start + 0.25 * ref, atol=ATOL, rtol=RTOL)
    class_attention(q, k, index, 0.125, out=out, weight=2.0)
    torch.testing.assert_close(out, start + 2.25 * ref, atol=ATOL, rtol=RTOL)
    # Without `out` the result is scaled the same way, into a fresh tensor.
    torch.testing.assert_close(class_attention(q, k, index, 0.125, weight=0.5), 0.5 * ref, atol=ATOL, rtol=RTOL)


def test_accumulates_into_a_slice_of_a_larger_buffer(triton_device):
    # Positive and negative rows are written into the two halves of one buffer.
    q, k, index = make_inputs(2, 2, 9, 40, 2, 2, seed=4, device=triton_device)
    buf = torch.zeros(4, 2, 9, device=triton_device)
    class_attention(q, k, index, 0.1, out=buf[2:])
    assert not buf[:2].any()
    torch.testing.assert_close(buf[2:], class_attention_reference(q, k, index, 0.1), atol=ATOL, rtol=RTOL)


def test_rejects_mismatched_arguments(triton_device):
    q, k, index = make_inputs(2, 2, 9, 40, 2, 2, device=triton_device)
    with pytest.raises(ValueError):
        class_attention(q, k[:1], index, 0.1)
    with pytest.raises(ValueError):
        class_attention(q, k, index[:, :, 0], 0.1)
    with pytest.raises(ValueError):
        class_attention(q, k, index, 0.1, out=torch.zeros(2, 2, 9, dtype=torch.float16, device=triton_device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_launch_gets_the_precision_of_its_inputs(monkeypatch, triton_device, dtype):
    spy = LaunchSpy(attention_capture._class_attention_kernel)
    monkeypatch.setattr(attention_capture, "_class_attention_kernel", spy)
    q, k, index = make_inputs(1, 2, 9, 40, 2, 2, dtype=dtype, device=triton_device)
    class_attention(q, k, index, 0.1)
    class_attention(q.float(), k, index, 0.1)  # mixed: promoted to float32
    want = dot_precision(dtype, attention_capture._INTERPRETED)
    assert spy.dots == [want, IEEE]
    assert want == IEEE or not attention_capture._INTERPRETED


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "r{}h{}n{}d{}c{}t{}".format(*s))
def test_float16_operand_path_matches_reference(monkeypatch, triton_device, shape):
    """The kernel's 16-bit branch, forced for float16 under the interpreter too (whose float16
    products are right; compiled, it is the branch float16 takes anyway)."""
    monkeypatch.setattr(attention_capture, "dot_precision", lambda dtype, interpreted: "fp16")
    q, k, index = make_inputs(*shape, dtype=torch.float16, seed=5, device=triton_device)
    scale = shape[3] ** -0.5
    torch.testing.assert_close(class_attention(q, k, index, scale), class_attention_reference(q, k, index, scale),
                               atol=ATOL, rtol=RTOL_16_BIT_DOTS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 8, 1024, 40, 3, 4), (4, 8, 256, 80, 8, 8), (2, 8, 64, 160, 2, 8),
                                   (3, 5, 4097, 64, 5, 3)], ids=lambda s: "r{}h{}n{}d{}c{}t{}".format(*s))
def test_compiled_kernel_matches_reference_on_gpu(shape, dtype):
    q, k, index = make_inputs(*shape, dtype=dtype, device="cuda")
    scale = shape[3] ** -0.5
    out = torch.rand(shape[0], shape[4], shape[2], device="cuda")
    want = out + 0.5 * class_attention_reference(q, k, index, scale)
    class_attention(q, k, index, scale, out=out, weight=0.5)
    assert (dot_precision(dtype, interpreted=False) != IEEE) == (dtype != torch.float32)
    torch.testing.assert_close(out, want, **tolerances(dtype))


@pytest.mark.parametrize(("layers", "groups"), [(1, 1), (3, 2), (2, 1)])
def test_several_layers_at_once_equal_the_reference_per_layer(layers, groups):
    """The CPU path: one stacked computation for a step's layers, the negatives' queries read
    against the positive keys, equals the reference per layer with those keys repeated."""
    from magicseg_engine.kernels.attention_capture import class_attention_layers

    b, h, n, d, c, t = 3, 4, 37, 40, 3, 4
    qs, ks = [], []
    for i in range(layers):
        q, k, index = make_inputs(groups * b, h, n, d, c, t, seed=10 + i)
        qs.append(q)
        ks.append(k[:b])
    index = index[:b]
    got = class_attention_layers(qs, ks, index, 0.158)
    want = sum(class_attention_reference(q, k.repeat(groups, 1, 1, 1), index.repeat(groups, 1, 1), 0.158)
               for q, k in zip(qs, ks))
    assert got.shape == (groups * b, c, n)
    torch.testing.assert_close(got, want, atol=ATOL * layers, rtol=RTOL)
    assert (got[0, 0] == 0).all()  # the class with no tokens


def test_several_layers_refuse_rows_that_are_not_groups_of_the_keys():
    from magicseg_engine.kernels.attention_capture import class_attention_layers

    q, k, index = make_inputs(5, 2, 8, 16, 2, 2)
    with pytest.raises(ValueError, match="not groups"):
        class_attention_layers([q], [k[:2]], index[:2], 0.25)
