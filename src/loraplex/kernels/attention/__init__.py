"""Paged attention over a mixed batch of prefill chunks and decodes, with the KV-cache write.

Only the torch reference exists so far; the Triton kernel arrives with the GPU engine and slots in
behind the same two functions.
"""

from .reference import paged_attention_reference, write_kv_reference

__all__ = ["paged_attention_reference", "write_kv_reference"]
