"""What the SGMV launchers share: dtype rules, device facts, and the CPU interpreter switch."""

from __future__ import annotations

import functools

import torch
import triton

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Multiprocessors assumed for CPU tensors (Triton's interpreter): small, so that the tests on
# tiny shapes also take the split-K path that decode batches take on a GPU.
_INTERPRETER_SMS = 4


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 activations get true fp32 products (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a host-side property query, no sync)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _device_sms(device.index if device.index is not None else 0)


def interpreting() -> bool:
    """Whether `triton.jit` builds interpreted kernels (TRITON_INTERPRET=1 at decoration time)."""
    return bool(triton.knobs.runtime.interpret)


def kernel_for(kernel, tensor: torch.Tensor):
    """The kernel to launch on `tensor`'s device. CPU tensors run only in Triton's interpreter,
    which must be on before the kernels are decorated (it also interprets triton.language's own
    jitted helpers such as tl.max); anything else is an error, never a silent fallback."""
    if tensor.is_cuda or interpreting():
        return kernel
    raise RuntimeError(
        "the Triton SGMV kernels ran on CPU tensors without TRITON_INTERPRET=1 set before "
        "triton was imported; use backend='torch' on CPU, or set the variable first"
    )
