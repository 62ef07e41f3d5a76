"""What bench_serve_scale.py prepares before the server starts: a checkpoint directory of the
Llama-3.1-8B shapes (config.json and a word-level tokenizer of its vocabulary; the weights are
`--load-format dummy`), and a data directory with tenants and N registered adapters.

Registering 1,024 adapters of 84 MB each through the upload route would take longer than the
whole benchmark may (every upload is streamed, hashed, validated and fsynced). So K distinct
random adapters go through the registry's real ingest, and the other names are catalog rows
that point at the same stored content (the store is content-addressed: two tenants uploading
one file share it the same way). Serving is per adapter id: each name has its own pool entry,
its own host copy and its own slot, and a cold one is read from disk, hashed and checked again
like any other.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from engine_workload import LLAMA_8B  # the standard workload's shapes
from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterRegistry,
    RegistryConfig,
    UploadLimits,
    UploadPart,
)
from loraplex.loadgen import BaseShapes, adapter_names, random_adapter
from loraplex.platform import ModelSpec

SMOKE = {  # the same code path on a CPU in seconds
    **LLAMA_8B,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def write_model_dir(root: Path, shapes: dict) -> Path:
    """config.json and a tokenizer whose every id decodes (token i is the word `t<i>`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(shapes))
    vocab = {f"t{i}": i for i in range(shapes["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="t1", eos_token="t2", unk_token="t0"
    )
    tokenizer.save_pretrained(root)
    return root


@dataclass
class Registered:
    """A data directory ready to serve: each tenant's key, and its adapters' names."""

    keys: dict[str, str]  # tenant name → API key
    names: list[str]
    seconds: dict[str, float]


def register(
    data_dir: Path,
    model_dir: Path,
    tenants: dict[str, int],
    rank: int,
    distinct: int,
    prefix: str = "bench-",
    log=print,
) -> Registered:
    """Tenant t gets adapters PREFIX0..PREFIX{n-1} (n = tenants[t]); `distinct` contents.

    The server must not be running (this takes the data directory's lock)."""
    import time

    spec = ModelSpec.from_dir(model_dir)
    shapes = BaseShapes.from_model_dir(model_dir)
    limits = UploadLimits(max_upload_bytes=1 << 34, max_weights_bytes=1 << 34)
    registry = AdapterRegistry(RegistryConfig(data_dir, rank, limits), spec)
    seconds = {"generate": 0.0, "ingest": 0.0, "rows": 0.0}
    try:
        keys, sources = {}, []
        for tenant_name, count in tenants.items():
            tenant = registry.tenants.create(tenant_name)
            keys[tenant_name], _ = registry.tenants.create_api_key(tenant.id, "bench")
            names = adapter_names(prefix, count)
            for i, name in enumerate(names):
                if len(sources) < distinct:  # the real ingest, once per content
                    started = time.perf_counter()
                    config, weights = random_adapter(shapes, rank, seed=i)
                    seconds["generate"] += time.perf_counter() - started
                    started = time.perf_counter()
                    parts = [
                        UploadPart(ADAPTER_CONFIG, io.BytesIO(config)),
                        UploadPart(ADAPTER_WEIGHTS, io.BytesIO(weights)),
                    ]
                    sources.append(registry.ingest(tenant.id, name, parts))
                    seconds["ingest"] += time.perf_counter() - started
                    continue
                started = time.perf_counter()
                _clone(registry, tenant.id, name, sources[i % distinct])
                seconds["rows"] += time.perf_counter() - started
            log(f"tenant {tenant_name}: {count} adapters ({len(sources)} contents)")
        return Registered(keys, adapter_names(prefix, max(tenants.values())), seconds)
    finally:
        registry.close()


def _clone(registry: AdapterRegistry, tenant_id: str, name: str, source) -> None:
    """A ready catalog row for `name` holding `source`'s stored content."""
    catalog = registry.catalog
    row = catalog.begin_upload(tenant_id, name)
    catalog.set_validating(row.id, source.size_bytes)
    catalog.mark_ready(
        row.id,
        sha256=source.sha256,
        size_bytes=source.size_bytes,
        rank=source.rank,
        alpha=source.alpha,
        targets=tuple(source.targets),
        base_model=source.base_model,
    )
