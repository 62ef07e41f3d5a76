"""tensor_views: the tensors of a checked safetensors file as views of its bytes equal what the
safetensors library loads, for every dtype an adapter may use, aligned or not."""

from __future__ import annotations

import warnings

import torch
from registry_files import safetensors_bytes
from safetensors.torch import load, save

from loraplex.adapters_registry.safetensors_header import read_header
from loraplex.adapters_registry.validate import tensor_views


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a16": torch.randn(3, 5, generator=gen).half(),
        "b16": torch.randn(7, 2, generator=gen).bfloat16(),
        "c32": torch.randn(4, 3, generator=gen),
        "d32": torch.randn(1, 9, generator=gen),
    }


def test_views_equal_the_library_on_its_own_files():
    data = save(_tensors(1))
    views = tensor_views(data, read_header(data))
    expected = load(data)
    assert views.keys() == expected.keys()
    for name, tensor in expected.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor)


def test_unaligned_header_and_spans_read_the_same_values():
    """A header of odd length and an F32 tensor after an odd number of F16 elements: every
    tensor starts at an address its dtype does not divide; the values are still exact."""
    tensors = _tensors(2)
    header, blob, offset = {}, b"", 0
    for name in ("a16", "c32", "b16", "d32"):  # 15 halves (30 bytes), then floats
        t = tensors[name]
        raw = (
            t.view(torch.uint8).numpy().tobytes()
            if t.dtype != torch.bfloat16
            else (t.view(torch.int16).numpy().tobytes())
        )
        code = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
        header[name] = {
            "dtype": code[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blob += raw
        offset += len(raw)
    header["__metadata__"] = {"pad": "x"}  # makes the header length odd below
    data = safetensors_bytes(header, blob)
    if (len(data) - len(blob)) % 2 == 0:
        header["__metadata__"] = {"pad": "xy"}
        data = safetensors_bytes(header, blob)
    assert (len(data) - len(blob)) % 2 == 1
    views = tensor_views(data, read_header(data))
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor), name
    assert views["c32"].data_ptr() % 4 != 0  # the case above is really unaligned


def test_views_copy_nothing():
    """Each view points into the file's own bytes (no copy, so nothing long holds the GIL)."""
    big = {f"t{i}": torch.randn(256, 1024) for i in range(8)}
    data = save(big)
    views = tensor_views(data, read_header(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for name, view in views.items():
        assert start <= view.data_ptr() < start + len(data), name
        assert torch.equal(view, big[name])
