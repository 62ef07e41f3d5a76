"""loraplex: one base LLM, many tenants' LoRA adapters, one in-flight batch.

Importing `loraplex` is cheap; `LLM` and `SamplingParams` load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from loraplex.offline import LLM
    from loraplex.platform import SamplingParams


def __getattr__(name: str):
    if name == "LLM":
        from loraplex.offline import LLM

        return LLM
    if name == "SamplingParams":
        from loraplex.platform import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
