"""What the attention launchers share: input checks, dtype rules, device facts, the interpreter."""

from __future__ import annotations

import functools

import torch
import triton

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Multiprocessors assumed for CPU tensors (Triton's interpreter): small, so that the tests on
# tiny shapes also take the split-K decode path that small batches take on a GPU.
_INTERPRETER_SMS = 4


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32-accurate products: three tf32 passes on the tensor cores (plain tf32
    would cost ~1e-3 relative error; "ieee" FMA dots spilled registers in the prefill tile)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
    which must be on before the kernels are decorated; anything else is an error, never a
    silent fallback."""
    if tensor.is_cuda or interpreting():
        return kernel
    raise RuntimeError(
        "the Triton attention kernels ran on CPU tensors without TRITON_INTERPRET=1 set "
        "before triton was imported; use backend='torch' on CPU, or set the variable first"
    )


def check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Raise unless the two caches are [num_blocks, block_size, kv_heads, head_dim] alike."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "expected key_cache and value_cache [num_blocks, block_size, num_kv_heads, "
            f"head_dim] alike, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype not in SUPPORTED_DTYPES or value_cache.dtype != key_cache.dtype:
        raise TypeError(
            f"caches {key_cache.dtype}/{value_cache.dtype}: one of bf16, fp16, fp32"
        )
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("the caches need unit stride along head_dim")


def check_rows(name: str, x: torch.Tensor, heads: int, head_dim: int) -> None:
    """Raise unless x is [num_tokens, heads, head_dim] with unit stride along head_dim."""
    if x.dim() != 3 or x.shape[1:] != (heads, head_dim):
        raise ValueError(
            f"{name} must be [num_tokens, {heads}, {head_dim}], got {tuple(x.shape)}"
        )
    if x.stride(2) != 1:
        raise ValueError(f"{name} needs unit stride along head_dim")


def check_int(name: str, x: torch.Tensor, dim: int, dtypes=(torch.int32,)) -> None:
    if x.dim() != dim or x.dtype not in dtypes:
        raise TypeError(
            f"{name} must be a {dim}-d {' or '.join(map(str, dtypes))} tensor"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs unit stride along its last dim")
