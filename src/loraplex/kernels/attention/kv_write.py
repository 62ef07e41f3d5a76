"""cache.flat[slot_mapping[t]] = kv[t] for key and value, for every token t with slot_mapping[t] >= 0.

The KV-cache write that runs right before the attention kernels in the same stream (so they see
this step's keys). One program copies one token's keys and values of every KV head; a negative
slot marks a padding token (CUDA-graph buckets pad the batch) and writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_cache, check_int, check_rows, kernel_for, next_pow2


@triton.jit
def write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_KVH)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    row = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_slot
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    key = tl.load(
        key_ptr
        + token * stride_key_token
        + heads[:, None] * stride_key_head
        + dims[None, :],
        mask=mask,
    )
    value = tl.load(
        value_ptr
        + token * stride_value_token
        + heads[:, None] * stride_value_head
        + dims[None, :],
        mask=mask,
    )
    tl.store(key_cache_ptr + row, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(
        value_cache_ptr + row, value.to(value_cache_ptr.dtype.element_ty), mask=mask
    )


def write_kv_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launch the write (the contract of `write_kv_reference`), in place.

    :param key_cache: [num_blocks, block_size, num_kv_heads, head_dim] bf16/fp16/fp32.
    :param value_cache: same shape, dtype and strides as key_cache.
    :param key: [num_tokens, num_kv_heads, head_dim] float, unit stride along head_dim.
    :param value: [num_tokens, num_kv_heads, head_dim] float, unit stride along head_dim.
    :param slot_mapping: [num_tokens] int64 or int32; negative = do not write.
    """
    check_cache(key_cache, value_cache)
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    check_rows("key", key, num_kv_heads, head_dim)
    check_rows("value", value, num_kv_heads, head_dim)
    check_int("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64))
    num_tokens = key.shape[0]
    if value.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError("key, value and slot_mapping disagree in num_tokens")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache need the same strides")
    if num_tokens == 0:
        return
    kernel_for(write_kv_kernel, key)[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_KVH=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        num_warps=4,
    )
