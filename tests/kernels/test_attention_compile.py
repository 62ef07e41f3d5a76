"""The attention kernels compile for an H100 (sm_90) on the CPU, exactly as the launchers call them.

Triton's interpreter checks what the kernels compute, not that they compile: a construct the
interpreter takes but the compiler refuses, or a tile that no longer fits shared memory, would
only show on a GPU. Here the launchers run against a stand-in that records each launch; the
recorded arguments are compiled ahead of time with Triton's own ptxas for sm_90 (bf16 serving
shapes of Llama-3.1-8B), and the shared memory and register spills of the result are checked.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

H100_SHARED_BYTES = (
    232448  # the most dynamic shared memory one block may ask for on sm_90
)
TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
}


def _record_launches(monkeypatch, modules=None):
    """Replace `kernel_for` in the launchers' `modules` (default: the attention kernels) with a
    recorder of (kernel, args, kwargs)."""
    from loraplex.kernels.attention import decode, kv_write, prefill

    launches = []

    def kernel_for(kernel, tensor):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

        return Grid()

    for module in modules or (decode, prefill, kv_write):
        monkeypatch.setattr(module, "kernel_for", kernel_for)
    return launches


def _compile_for_sm90(kernel, args, kwargs):
    """Compile one recorded launch as Triton's launcher would specialise it on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[i] if i < len(args) else kwargs[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
        elif kernel.params[i].is_constexpr:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, int) and kernel.params[i].do_not_specialize:
            signature[name] = "i32"
        elif value == 1:  # other ints equal to 1 specialise
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(
        fn=kernel, signature=signature, constexprs=constants, attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _spilled_bytes(cubin: bytes, tmp_path: Path) -> int | None:
    import triton

    tool = Path(triton.__path__[0]) / "backends/nvidia/bin/cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run(
        [str(tool), "--dump-resource-usage", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels"
)
def test_serving_kernels_compile_for_h100(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    import triton

    if not (Path(triton.__path__[0]) / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    from loraplex.kernels.attention.decode import DecodeConfig, launch_decode
    from loraplex.kernels.attention.kv_write import write_kv_triton
    from loraplex.kernels.attention.prefill import choose_prefill_config, launch_prefill

    launches = _record_launches(monkeypatch)
    meta = {"device": "meta"}
    query = torch.empty(64, 32, 128, dtype=torch.bfloat16, **meta)
    cache = torch.empty(4096, 16, 8, 128, dtype=torch.bfloat16, **meta)
    tables = torch.empty(64, 512, dtype=torch.int32, **meta)
    starts = torch.empty(65, dtype=torch.int32, **meta)
    lens = torch.empty(64, dtype=torch.int32, **meta)
    batch = (query, cache, cache, tables, starts, lens, query)
    launch_decode(*batch, 0.08, None, DecodeConfig(block_n=64, num_splits=1))
    launch_decode(*batch, 0.08, 4096, DecodeConfig(block_n=64, num_splits=8))
    cuda = torch.device("cuda")
    config = choose_prefill_config(128, torch.bfloat16, cuda)
    launch_prefill(*batch, 0.08, 4096, config)
    kv = torch.empty(64, 8, 128, dtype=torch.bfloat16, **meta)
    write_kv_triton(cache, cache, kv, kv, torch.empty(64, dtype=torch.int64, **meta))
    assert len(launches) == 5  # decode, decode + combine, prefill, write
    for kernel, args, kwargs in launches:
        compiled = _compile_for_sm90(kernel, args, kwargs)
        name = kernel.__name__
        assert compiled.metadata.shared <= H100_SHARED_BYTES, name
        assert _spilled_bytes(compiled.asm["cubin"], tmp_path) in (0, None), name
