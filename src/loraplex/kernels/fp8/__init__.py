"""FP8 (e4m3) quantization with per-channel weight scales and per-token activation scales.

Only the torch references exist so far; `torch._scaled_mm` and a Triton small-M GEMM arrive with
the compiled FP8 engine.
"""

from .reference import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_reference,
    fp8_linear_reference,
    quantize_per_channel_reference,
    quantize_per_token_reference,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_reference",
    "fp8_linear_reference",
    "quantize_per_channel_reference",
    "quantize_per_token_reference",
]
