"""A minimal Triton kernel that tells whether Triton can run here (compiled or interpreted).

`doctor` runs it in a subprocess, once with TRITON_INTERPRET=1 on the CPU and once compiled
on the GPU when there is one.

Dots: none (no tl.dot); elementwise arithmetic in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid)
    y = tl.load(y_ptr + offsets, mask=valid)
    tl.store(out_ptr + offsets, alpha * x + y, mask=valid)


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * x + y for 1-D contiguous tensors, computed by Triton."""
    out = torch.empty_like(x)
    n = x.numel()
    block = 128
    _scale_add_kernel[(triton.cdiv(n, block),)](x, y, out, alpha, n, BLOCK=block)
    return out


def scale_add_reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * x + y


def check(device: str) -> None:
    """Raise if the kernel disagrees with its reference on `device`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen).to(device)
    y = torch.randn(1000, generator=gen).to(device)
    torch.testing.assert_close(scale_add(x, y, 0.5), scale_add_reference(x, y, 0.5))


if __name__ == "__main__":
    import sys

    check(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("ok")
