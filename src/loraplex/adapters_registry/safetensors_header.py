"""The safetensors header, parsed and checked by hand before any tensor byte is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then a data
blob. The JSON maps tensor names to {dtype, shape, data_offsets: [begin, end)} (offsets into the
blob) plus an optional "__metadata__" of strings. Nothing here trusts a size or an offset: the
length is checked against the file before anything is allocated, every tensor's span must lie in
the blob and match dtype size × shape, and the spans must tile the blob exactly (as the
safetensors library itself requires), so no two tensors overlap and no bytes hide between them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

from .errors import AdapterInvalid

WEIGHTS_NAME = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it (already checked against the file)."""

    name: str
    dtype: str  # a safetensors dtype code: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # byte offset of the first byte in the data blob
    end: int  # byte offset one past the last byte in the data blob


def read_header_from_file(
    f: BinaryIO, file_size: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> dict[str, TensorEntry]:
    """Read and check the header of an open safetensors file of `file_size` bytes.

    :raises AdapterInvalid: naming the first problem (length, JSON, a tensor's offsets...).
    """
    length = _header_length(f.read(8), file_size, max_header_bytes)
    raw = f.read(length)
    if len(raw) != length:
        raise AdapterInvalid(f"{WEIGHTS_NAME} ends inside its header", WEIGHTS_NAME)
    return parse_header(raw, file_size - 8 - length)


def read_header(
    data: bytes | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
) -> dict[str, TensorEntry]:
    """Read and check the header of a whole safetensors file held in memory."""
    length = _header_length(bytes(data[:8]), len(data), max_header_bytes)
    return parse_header(bytes(data[8 : 8 + length]), len(data) - 8 - length)


def _header_length(prefix: bytes, file_size: int, max_header_bytes: int) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME} is {file_size} bytes: too short to be a safetensors file",
            WEIGHTS_NAME,
        )
    if prefix[:1] == b"\x80" or prefix[:4] == b"PK\x03\x04":
        raise AdapterInvalid(
            f"{WEIGHTS_NAME} looks like a pickle or torch.save file, which loraplex never "
            "loads; save the adapter with safe_serialization=True",
            WEIGHTS_NAME,
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > file_size - 8:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: header length {length} runs past the end of the file "
            f"({file_size} bytes); the file is truncated or not safetensors",
            WEIGHTS_NAME,
        )
    if length > max_header_bytes:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: header length {length} is over the {max_header_bytes}-byte cap",
            WEIGHTS_NAME,
        )
    if length < 2:
        raise AdapterInvalid(f"{WEIGHTS_NAME}: header is empty", WEIGHTS_NAME)
    return length


def parse_header(raw: bytes, blob_size: int) -> dict[str, TensorEntry]:
    """Check the header JSON against a data blob of `blob_size` bytes."""
    try:
        table = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: header is not valid UTF-8 JSON: {exc}", WEIGHTS_NAME
        ) from None
    if not isinstance(table, dict):
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: header must be a JSON object", WEIGHTS_NAME
        )
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: __metadata__ must map strings to strings", "__metadata__"
        )
    entries = {name: _entry(name, info, blob_size) for name, info in table.items()}
    _check_tiling(sorted(entries.values(), key=lambda e: (e.begin, e.end)), blob_size)
    return entries


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: object, blob_size: int) -> TensorEntry:
    where = f"{WEIGHTS_NAME}: tensor {name}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterInvalid(
            f"{where} must have exactly dtype, shape and data_offsets", name
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise AdapterInvalid(f"{where} has unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise AdapterInvalid(
            f"{where} has shape {shape!r}: expected a list of non-negative ints", name
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
    ):
        raise AdapterInvalid(
            f"{where} has data_offsets {offsets!r}: expected [begin, end]", name
        )
    begin, end = offsets
    if not 0 <= begin <= end <= blob_size:
        raise AdapterInvalid(
            f"{where} has data_offsets [{begin}, {end}] outside the data "
            f"({blob_size} bytes)",
            name,
        )
    needed = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != needed:
        raise AdapterInvalid(
            f"{where}: data_offsets span {end - begin} bytes but {dtype} × "
            f"{tuple(shape)} needs {needed}",
            name,
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_tiling(ordered: list[TensorEntry], blob_size: int) -> None:
    position = 0
    previous: TensorEntry | None = None
    for entry in ordered:
        if entry.begin < position and previous is not None:
            raise AdapterInvalid(
                f"{WEIGHTS_NAME}: tensors {previous.name} and {entry.name} overlap",
                entry.name,
            )
        if entry.begin > position:
            raise AdapterInvalid(
                f"{WEIGHTS_NAME}: data bytes [{position}, {entry.begin}) belong to no "
                "tensor",
                entry.name,
            )
        position, previous = entry.end, entry
    if position != blob_size:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME}: data bytes [{position}, {blob_size}) belong to no tensor",
            WEIGHTS_NAME,
        )
