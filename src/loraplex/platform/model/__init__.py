"""The Llama-family model, its layers and its checkpoint loader."""

from .layers import LoraLinear
from .llama import LlamaForCausalLM
from .loader import checkpoint_files, init_dummy_weights, load_weights

__all__ = [
    "LlamaForCausalLM",
    "LoraLinear",
    "checkpoint_files",
    "init_dummy_weights",
    "load_weights",
]
