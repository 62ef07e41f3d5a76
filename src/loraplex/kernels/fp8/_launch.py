"""What the FP8 launchers share: constants the kernels read, dtype rules, the interpreter switch."""

from __future__ import annotations

import torch
import triton.language as tl

from ..sgmv._launch import interpreting, next_pow2, num_sms

__all__ = [
    "FP8_MAX",
    "MIN_SCALE",
    "OUT_DTYPES",
    "QUANT_DTYPES",
    "kernel_for",
    "next_pow2",
    "num_sms",
]

# The same numbers as reference.py (448 = e4m3's largest finite value), as kernel constants.
FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)
QUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_for(kernel, tensor: torch.Tensor):
    """The kernel to launch on `tensor`'s device: CUDA, or Triton's interpreter on the CPU when
    TRITON_INTERPRET=1 was set before triton was imported. Anything else is an error, never a
    silent fallback to the torch reference."""
    if tensor.is_cuda or interpreting():
        return kernel
    raise RuntimeError(
        "the Triton FP8 kernels ran on CPU tensors without TRITON_INTERPRET=1 set before "
        "triton was imported; use backend='torch' on CPU, or set the variable first"
    )
