"""The small elementwise steps of a decoder layer, as pure functions that torch.compile can fuse.

Eager, each of these is 3 to 10 kernels (casts, reductions, gathers, concatenations); a decode
step of a 32-layer model runs about a thousand of them, ~1 µs each even inside a CUDA graph. The
engine compiles them once (`compiled_fusions`), each into one or two kernels, unless
`enforce_eager` is set. The eager versions are the spec: the compiled ones must match them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w · x / sqrt(mean(x²) + eps), computed in float32 as transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q·cos + rotate_half(q)·sin (and the same for k) at each token's position.

    :param positions: [T] int64.
    :param q: [T, H, D]; k: [T, KVH, D].
    :param cos_cache: [max_positions, D] float32; sin_cache likewise.
    """
    cos = cos_cache[positions].to(q.dtype)[:, None, :]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, where gate_up [T, 2·I] holds gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Fusions:
    """The functions the layers call for their elementwise steps (eager or compiled)."""

    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    rotary: Callable = rotary
    silu_and_mul: Callable = silu_and_mul
    compiled: bool = False


EAGER = Fusions()


@functools.cache
def compiled_fusions() -> Fusions:
    """Each function through torch.compile with dynamic shapes (one compile per function for
    every token count); compilation happens at the first call, which the engine makes while
    profiling memory and warming up its graphs, never inside a capture. Cached: every engine
    of a process shares one set of compiled functions."""

    def compile_one(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=True, fullgraph=True)

    # Dynamo counts recompilations per function: a process holding engines of several dtypes
    # or models (tests, the build's quality gate) needs more than the default 8 variants.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    log.info("compiling the norm, rotary and activation fusions with torch.compile")
    return Fusions(
        rms_norm=compile_one(rms_norm),
        add_rms_norm=compile_one(add_rms_norm),
        rotary=compile_one(rotary),
        silu_and_mul=compile_one(silu_and_mul),
        compiled=True,
    )
