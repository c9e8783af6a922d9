"""What the kernels' matrix products (`tl.dot`) multiply, chosen when a kernel is launched.

One kernel body serves every case through a constexpr argument, DOT:

- "ieee": both operands float32, IEEE products. For float32 inputs, since TF32 would cost ~3
  decimal digits of the result, and always under Triton's interpreter, which multiplies
  bfloat16 operands wrongly;
- "fp16" / "bf16": compiled kernels with 16-bit inputs: the operands in that type, accumulated
  in float32 (the tensor cores' native form). A product of the inputs' own values is exact
  then; an operand computed in float32 inside the kernel is rounded to that type first.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton.
    triton = None

IEEE, FP16, BF16 = "ieee", "fp16", "bf16"

_SIXTEEN_BIT = {torch.float16: FP16, torch.bfloat16: BF16}


def dot_precision(dtype: torch.dtype, interpreted: bool) -> str:
    """DOT for a kernel whose dot operands come in `dtype` (pass torch.promote_types of two
    inputs: float16 with bfloat16 promotes to float32, and gets "ieee")."""
    if interpreted:
        return IEEE
    return _SIXTEEN_BIT.get(dtype, IEEE)


if triton is not None:

    @triton.jit
    def dot_acc(a, b, acc, DOT: tl.constexpr):
        """acc + a @ b, acc float32, with the operands converted as DOT says."""
        if DOT == "ieee":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT == "fp16":
            return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            tl.static_assert(DOT == "bf16", "DOT is 'ieee', 'fp16' or 'bf16'")
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
