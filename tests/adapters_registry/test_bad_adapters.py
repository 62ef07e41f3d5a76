"""One bad adapter per validation rule: each is refused with its own message, nothing is left.

Every case goes through AdapterRegistry.ingest, the path an upload takes, and then checks that
no temp file and no stored file remain and that the row is failed with that same message.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zipfile

import pytest
import torch
from registry_files import CONFIG, WEIGHTS, AdapterFiles, safetensors_bytes
from safetensors.torch import load, save

from loraplex.adapters_registry import (
    AdapterInvalid,
    AdapterTooLarge,
    NameInvalid,
    UnsupportedFormat,
    UploadPart,
)
from loraplex.adapters_registry.adapter_config import _UNSUPPORTED

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def tensors(good: AdapterFiles) -> dict[str, torch.Tensor]:
    return load(good.weights)


def with_tensors(good: AdapterFiles, change) -> AdapterFiles:
    t = tensors(good)
    change(t)
    return AdapterFiles(good.config, save(t))


def with_weights(good: AdapterFiles, weights: bytes) -> AdapterFiles:
    return AdapterFiles(good.config, weights)


def one_tensor_file(header_entry: dict, data: bytes) -> bytes:
    return safetensors_bytes({Q_A: header_entry}, data)


def archive(kind: str, members: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            if link:
                info = zipfile.ZipInfo(link)
                info.external_attr = 0o120777 << 16
                zf.writestr(info, "/etc/passwd")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            if link:
                info = tarfile.TarInfo(link)
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tf.addfile(info)
    return buf.getvalue()


def parts_of(files: AdapterFiles) -> list[UploadPart]:
    return files.parts()


def upload(name: str, data: bytes) -> list[UploadPart]:
    return [UploadPart(name, io.BytesIO(data))]


def gzip_bomb() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(WEIGHTS)
        info.size = 64 << 20
        tf.addfile(info, io.BytesIO(bytes(64 << 20)))
    return buf.getvalue()


# (case id, builder of the upload's parts from the good adapter, exception, message regex)
CASES = [
    # files and formats
    ("extra-file", lambda g: [*g.parts(), UploadPart("tokenizer.json", io.BytesIO(b"{}"))],
     UnsupportedFormat, r"'tokenizer.json' is not allowed"),
    ("pickle-weights", lambda g: [g.parts()[0], UploadPart("adapter_model.bin", io.BytesIO(b"\x80\x04."))],
     UnsupportedFormat, r"'adapter_model.bin' is a pickle-based format.*safe_serialization=True"),
    ("missing-weights", lambda g: g.parts()[:1], UnsupportedFormat,
     r"adapter_model.safetensors is missing"),
    ("sent-twice", lambda g: [*g.parts(), g.parts()[1]], UnsupportedFormat,
     r"adapter_model.safetensors was sent twice"),
    ("upload-over-cap", lambda g: [g.parts()[0], UploadPart(WEIGHTS, io.BytesIO(bytes(5 << 20)))],
     AdapterTooLarge, r"over its \d+-byte cap"),
    ("archive-traversal", lambda g: upload("a.tar.gz", archive("tar.gz", {"../" + CONFIG: g.config, WEIGHTS: g.weights})),
     UnsupportedFormat, r"points outside the archive"),
    ("archive-absolute", lambda g: upload("a.zip", archive("zip", {"/" + CONFIG: g.config, WEIGHTS: g.weights})),
     UnsupportedFormat, r"points outside the archive"),
    ("archive-in-folder", lambda g: upload("a.zip", archive("zip", {"x/" + CONFIG: g.config, "x/" + WEIGHTS: g.weights})),
     UnsupportedFormat, r"is inside a folder"),
    ("archive-symlink-tar", lambda g: upload("a.tgz", archive("tar.gz", {CONFIG: g.config}, link=WEIGHTS)),
     UnsupportedFormat, r"is a link"),
    ("archive-symlink-zip", lambda g: upload("a.zip", archive("zip", {CONFIG: g.config}, link=WEIGHTS)),
     UnsupportedFormat, r"is a symbolic link"),
    ("archive-extra", lambda g: upload("a.zip", archive("zip", {CONFIG: g.config, WEIGHTS: g.weights, "model.pt": b"x"})),
     UnsupportedFormat, r"'model.pt' is a pickle-based format"),
    ("archive-bomb", lambda g: upload("a.tar.gz", gzip_bomb()), AdapterTooLarge,
     r"adapter_model.safetensors is 67108864 bytes, over its"),
    ("zip-bomb", lambda g: upload("a.zip", archive("zip", {CONFIG: bytes(64 << 20), WEIGHTS: g.weights})),
     AdapterTooLarge, r"adapter_config.json is 67108864 bytes, over its 65536-byte cap"),
    ("archive-damaged", lambda g: upload("a.zip", b"PK\x03\x04 this is no zip"),
     UnsupportedFormat, r"the zip archive is damaged"),
    ("archive-plus-file", lambda g: [UploadPart("a.zip", io.BytesIO(b"")), g.parts()[0]],
     UnsupportedFormat, r"an archive must be the only file of its upload"),
    # 1. config schema and types
    ("config-not-json", lambda g: AdapterFiles(b"{nope", g.weights).parts(), AdapterInvalid,
     r"adapter_config.json is not valid JSON"),
    ("config-not-object", lambda g: AdapterFiles(b"[1, 2]", g.weights).parts(), AdapterInvalid,
     r"adapter_config.json must be a JSON object"),
    ("config-over-cap", lambda g: AdapterFiles(b" " * 70_000 + b"{}", g.weights).parts(),
     AdapterTooLarge, r"adapter_config.json is over its 65536-byte cap"),
    ("peft-type", lambda g: g.with_config(peft_type="IA3").parts(), AdapterInvalid,
     r"peft_type 'IA3' is not supported"),
    ("r-type", lambda g: g.with_config(r="8").parts(), AdapterInvalid,
     r"r must be a positive integer, got '8'"),
    ("alpha-type", lambda g: g.with_config(lora_alpha=-1).parts(), AdapterInvalid,
     r"lora_alpha must be a positive number, got -1"),
    ("alpha-infinite", lambda g: g.with_config(lora_alpha=float("inf")).parts(), AdapterInvalid,
     r"lora_alpha must be a positive number, got inf"),
    ("rslora-type", lambda g: g.with_config(use_rslora="yes").parts(), AdapterInvalid,
     r"use_rslora must be true or false"),
    ("targets-type", lambda g: g.with_config(target_modules=5).parts(), AdapterInvalid,
     r"target_modules must be a list of module names or a regex string"),
    ("targets-regex", lambda g: g.with_config(target_modules="(").parts(), AdapterInvalid,
     r"target_modules regex is invalid"),
    ("rank-pattern-type", lambda g: g.with_config(rank_pattern={"q_proj": "x"}).parts(),
     AdapterInvalid, r"rank_pattern must map module patterns to positive numbers"),
    ("base-model-type", lambda g: g.with_config(base_model_name_or_path=3).parts(),
     AdapterInvalid, r"base_model_name_or_path must be a string"),
    # 2. unsupported PEFT features: see test_each_unsupported_feature_is_named
    ("bias", lambda g: g.with_config(bias="all").parts(), AdapterInvalid,
     r"bias='all' is not supported: only 'none'"),
    ("pissa-init", lambda g: g.with_config(init_lora_weights="pissa_niter_4").parts(),
     AdapterInvalid, r"init_lora_weights='pissa_niter_4' changes the base weights"),
    # 3. ranks
    ("rank-over-max", lambda g: g.with_config(r=32).parts(), AdapterInvalid,
     r"r: rank 32 exceeds max_lora_rank 16"),
    ("rank-pattern-over-max", lambda g: g.with_config(rank_pattern={"q_proj": 64}).parts(),
     AdapterInvalid, r"rank_pattern\['q_proj'\]: rank 64 exceeds max_lora_rank 16"),
    # 4. safetensors header
    ("weights-too-short", lambda g: with_weights(g, b"\x01\x00").parts(), AdapterInvalid,
     r"is 2 bytes: too short to be a safetensors file"),
    ("weights-pickle-bytes", lambda g: with_weights(g, b"\x80\x04\x95" + bytes(40)).parts(),
     AdapterInvalid, r"looks like a pickle or torch.save file"),
    ("header-past-end", lambda g: with_weights(g, struct.pack("<Q", 10**9) + b"{}").parts(),
     AdapterInvalid, r"header length 1000000000 runs past the end of the file \(10 bytes\)"),
    ("header-not-json", lambda g: with_weights(g, struct.pack("<Q", 4) + b"{{{{").parts(),
     AdapterInvalid, r"header is not valid UTF-8 JSON"),
    ("header-duplicate-key", lambda g: with_weights(g, struct.pack("<Q", 37) + b'{"__metadata__":{},"__metadata__":{}}').parts(),
     AdapterInvalid, r"header is not valid UTF-8 JSON: key '__metadata__' appears twice"),
    ("header-unknown-dtype", lambda g: with_weights(g, one_tensor_file(
        {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, bytes(4))).parts(),
     AdapterInvalid, rf"tensor {Q_A} has unknown dtype 'F99'"),
    ("header-offsets-outside", lambda g: with_weights(g, one_tensor_file(
        {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}, bytes(16))).parts(),
     AdapterInvalid, r"data_offsets \[0, 2048\] outside the data \(16 bytes\)"),
    ("header-dtype-x-shape", lambda g: with_weights(g, one_tensor_file(
        {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 16]}, bytes(16))).parts(),
     AdapterInvalid, r"data_offsets span 16 bytes but F32 × \(8, 64\) needs 2048"),
    ("header-overlap", lambda g: with_weights(g, safetensors_bytes({
        Q_A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        Q_B: {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))).parts(),
     AdapterInvalid, r"overlap"),
    ("header-hole", lambda g: with_weights(g, one_tensor_file(
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, bytes(12))).parts(),
     AdapterInvalid, r"data bytes \[8, 12\) belong to no tensor"),
    # 5. key grammar
    ("key-unknown", lambda g: with_tensors(g, lambda t: t.update(
        {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 64)})).parts(),
     AdapterInvalid, r"not a LoRA weight of a Llama-family decoder layer"),
    ("key-embedding", lambda g: with_tensors(g, lambda t: t.update(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 256)})).parts(),
     AdapterInvalid, r"LoRA on embeddings is not supported"),
    ("key-lm-head", lambda g: with_tensors(g, lambda t: t.update(
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)})).parts(),
     AdapterInvalid, r"LoRA on lm_head is not supported"),
    ("key-dora-magnitude", lambda g: with_tensors(g, lambda t: t.update(
        {Q_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.zeros(64)})).parts(),
     AdapterInvalid, r"DoRA is not supported"),
    ("key-bias", lambda g: with_tensors(g, lambda t: t.update(
        {Q_B.replace(".weight", ".bias"): torch.zeros(64)})).parts(),
     AdapterInvalid, r"LoRA biases are not supported"),
    ("key-wrong-parent", lambda g: with_tensors(g, lambda t: t.update(
        {Q_A.replace("self_attn.q_proj", "self_attn.gate_proj"): torch.zeros(8, 64)})).parts(),
     AdapterInvalid, r"gate_proj does not live under self_attn"),
    # 6. pairs, targets, shapes against the base model
    ("no-tensors", lambda g: with_weights(g, save({})).parts(), AdapterInvalid,
     r"adapter_model.safetensors holds no LoRA tensors"),
    ("missing-pair", lambda g: with_tensors(g, lambda t: t.pop(Q_B)).parts(), AdapterInvalid,
     r"model.layers.0.self_attn.q_proj.lora_B.weight is missing"),
    ("untargeted", lambda g: g.with_config(target_modules=["v_proj", "down_proj"]).parts(),
     AdapterInvalid, r"model.layers.0.self_attn.q_proj has LoRA tensors but target_modules"),
    ("layer-out-of-range", lambda g: with_tensors(g, lambda t: t.update({
        Q_A.replace("layers.0", "layers.7"): torch.zeros(8, 64),
        Q_B.replace("layers.0", "layers.7"): torch.zeros(64, 8)})).parts(),
     AdapterInvalid, r"layer 7 q_proj: the base model has 2 layers"),
    ("rank-vs-config", lambda g: g.with_config(rank_pattern={"q_proj": 4}).parts(),
     AdapterInvalid, r"q_proj.lora_A.weight has rank 8, but the config says 4"),
    ("shape-a", lambda g: with_tensors(g, lambda t: t.update({Q_A: torch.zeros(8, 48)})).parts(),
     AdapterInvalid, r"layer 0 q_proj: lora_A has shape \(8, 48\), expected \(8, 64\)"),
    ("shape-b", lambda g: with_tensors(g, lambda t: t.update({Q_B: torch.zeros(32, 8)})).parts(),
     AdapterInvalid, r"layer 0 q_proj: lora_B has shape \(32, 8\), expected \(64, 8\)"),
    ("not-2d", lambda g: with_tensors(g, lambda t: t.update({Q_B: torch.zeros(64, 8, 1)})).parts(),
     AdapterInvalid, rf"tensor {Q_B} must be 2-D"),
    # 7. dtype
    ("dtype", lambda g: with_tensors(g, lambda t: t.update({Q_B: torch.zeros(64, 8, dtype=torch.int32)})).parts(),
     AdapterInvalid, rf"tensor {Q_B} has dtype I32; use F16, BF16 or F32"),
    # 8. values
    ("nan", lambda g: with_tensors(g, lambda t: t[Q_B].__setitem__((3, 3), float("nan"))).parts(),
     AdapterInvalid, rf"tensor {Q_B} contains NaN or Inf"),
    ("inf", lambda g: with_tensors(g, lambda t: t[Q_A].__setitem__((0, 0), float("inf"))).parts(),
     AdapterInvalid, rf"tensor {Q_A} contains NaN or Inf"),
]  # fmt: skip


def assert_refused(registry, tenant, parts, error, pattern):
    before = registry.store.stored()
    with pytest.raises(error, match=pattern) as caught:
        registry.ingest(tenant.id, "bad", parts)
    assert registry.store.temp_entries() == []
    assert registry.store.stored() == before
    (row,) = [a for a in registry.catalog.list_adapters(tenant.id) if a.name == "bad"][
        -1:
    ]
    assert row.state == "failed" and row.error == str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "build,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_adapter_is_refused_and_nothing_is_left(
    registry, tenant, good, build, error, pattern
):
    assert_refused(registry, tenant, build(good), error, pattern)


def test_every_case_has_its_own_message(registry, tenant, good):
    seen: dict[str, str] = {}
    for case, build, error, pattern in CASES:
        with pytest.raises(error, match=pattern) as caught:
            registry.ingest(tenant.id, "bad", build(good))
        message = str(caught.value)
        assert message not in seen, f"{case} and {seen.get(message)} say the same"
        seen[message] = case


@pytest.mark.parametrize(
    "field,off,name", _UNSUPPORTED, ids=[u[0] for u in _UNSUPPORTED]
)
def test_each_unsupported_feature_is_named(registry, tenant, good, field, off, name):
    value = ["x"] if off is None else True
    error = assert_refused(
        registry,
        tenant,
        good.with_config(**{field: value}).parts(),
        AdapterInvalid,
        re.escape(name),
    )
    assert str(error) == f"{name} is not supported; retrain or merge without it"
    assert error.field == field


def test_validation_stops_at_the_first_rule_in_order(registry, tenant, good):
    # Broken three ways (config type, a feature, a tensor): the config type is named.
    files = with_tensors(good, lambda t: t.pop(Q_B)).with_config(r="x", use_dora=True)
    with pytest.raises(AdapterInvalid, match="r must be a positive integer"):
        registry.ingest(tenant.id, "bad", files.parts())
    files = with_tensors(good, lambda t: t.pop(Q_B)).with_config(use_dora=True, r=64)
    with pytest.raises(AdapterInvalid, match="DoRA"):
        registry.ingest(tenant.id, "bad", files.parts())
    files = with_tensors(good, lambda t: t.pop(Q_B)).with_config(r=64)
    with pytest.raises(AdapterInvalid, match="rank 64 exceeds"):
        registry.ingest(tenant.id, "bad", files.parts())


def test_header_is_checked_before_any_tensor_is_read(
    registry, tenant, good, monkeypatch
):
    from loraplex.adapters_registry import validate

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the header checks finished")

    monkeypatch.setattr(validate, "safe_open", no_reading)
    bad = with_tensors(good, lambda t: t.update({Q_A: torch.zeros(8, 48)}))
    with pytest.raises(AdapterInvalid, match="lora_A has shape"):
        registry.ingest(tenant.id, "bad", bad.parts())


@pytest.mark.parametrize(
    "name", ["", "-x", "x-", "a/b", "../x", "a" * 64, "naïve", "a.b"]
)
def test_bad_names_are_refused_before_reading(registry, tenant, good, name):
    class Unreadable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body was read")

    with pytest.raises(NameInvalid, match="use 1-63 letters, digits"):
        registry.ingest(tenant.id, name, [UploadPart(CONFIG, Unreadable())])
    assert registry.catalog.list_adapters(tenant.id) == []
