"""Random PEFT LoRA adapters for a base model, written without torch, and their upload.

The shapes come from the base model's config.json; the files are exactly what PEFT saves
(`adapter_config.json` + `adapter_model.safetensors`, tensors named
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...), so the server
validates and serves them like any trained adapter.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .workload import adapter_names

MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class BaseShapes:
    """The linear shapes of a Llama-family checkpoint, from its config.json."""

    num_layers: int
    hidden: int
    intermediate: int
    q_out: int
    kv_out: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseShapes:
        """:raises ValueError: no readable config.json, or a field missing from it."""
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
            return cls.from_config(raw.get("text_config", raw))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: cannot read the model's shapes ({exc!r})"
            ) from None

    @classmethod
    def from_config(cls, raw: dict) -> BaseShapes:
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)
        return cls(
            num_layers=int(raw["num_hidden_layers"]),
            hidden=int(raw["hidden_size"]),
            intermediate=int(raw["intermediate_size"]),
            q_out=heads * head_dim,
            kv_out=int(raw.get("num_key_value_heads") or heads) * head_dim,
        )

    def linear(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        return {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


def _as_dtype(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    bits = values.astype("<f4").view("<u4")  # bfloat16: the high half, rounded to even
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def safetensors_bytes(tensors: dict[str, tuple[np.ndarray, str]]) -> bytes:
    """A safetensors file of float tensors (name → (float32 values, dtype name))."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, (values, dtype) in tensors.items():
        data = _as_dtype(values, dtype)
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(values.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (
        -len(raw) % 8
    )  # the data starts 8-byte aligned, as safetensors writes
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def random_adapter(
    shapes: BaseShapes,
    rank: int,
    seed: int,
    targets: tuple[str, ...] = tuple(MODULES),
    dtype: str = "bfloat16",
    alpha: float | None = None,
) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random rank-`rank` adapter.

    A is uniform in ±1/sqrt(in) as PEFT initialises it; B is small and non-zero, so the
    adapter changes the output without swamping the base model.
    """
    unknown = sorted(set(targets) - set(MODULES))
    if unknown or not targets:
        raise ValueError(f"targets must be among {sorted(MODULES)}, got {unknown}")
    if dtype not in _CODES:
        raise ValueError(f"dtype must be one of {sorted(_CODES)}")
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for module in targets:
            d_in, d_out = shapes.linear(module)
            prefix = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            bound = 1.0 / np.sqrt(d_in)
            a = rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)
            b = (rng.standard_normal((d_out, rank), dtype=np.float32) * 0.01).astype(
                np.float32
            )
            tensors[f"{prefix}.lora_A.weight"] = (a, dtype)
            tensors[f"{prefix}.lora_B.weight"] = (b, dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": float(alpha if alpha is not None else 2 * rank),
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
    }
    return json.dumps(config, indent=2).encode(), safetensors_bytes(tensors)


@dataclass
class UploadReport:
    """How an upload of many adapters went."""

    uploaded: int = 0
    existed: int = 0  # the name was taken (and replace was not asked for)
    failed: Counter = field(default_factory=Counter)  # status (or error) → count
    messages: list[str] = field(default_factory=list)  # the first few failures
    seconds: float = 0.0
    bytes_sent: int = 0

    def __str__(self) -> str:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items()))
        return (
            f"{self.uploaded} uploaded, {self.existed} already there, "
            f"{sum(self.failed.values())} failed{f' ({failed})' if failed else ''} "
            f"in {self.seconds:.1f} s ({self.bytes_sent / 1e6:.1f} MB sent)"
        )


async def upload_adapters(
    base_url: str,
    api_keys: list[str],
    shapes: BaseShapes,
    count: int,
    rank: int,
    *,
    prefix: str = "bench-",
    start: int = 0,
    distinct: int | None = None,
    concurrency: int = 4,
    replace: bool = False,
    dtype: str = "bfloat16",
    targets: tuple[str, ...] = tuple(MODULES),
    seed: int = 0,
    alpha: float | None = None,
    timeout_s: float = 600.0,
) -> UploadReport:
    """Upload adapters PREFIX{start}..PREFIX{start+count-1} for every key.

    :param distinct: how many different contents to cycle through (default: all different);
        fewer saves generation time and disk, since the server stores content once.
    """
    report = UploadReport()
    started = time.perf_counter()
    distinct = max(1, min(distinct or count, count))
    made: dict[int, asyncio.Task] = {}  # content → its generation, shared by every user
    semaphore = asyncio.Semaphore(concurrency)

    async def files(index: int) -> tuple[bytes, bytes]:
        content = index % distinct
        task = made.get(content)
        if task is None:
            task = asyncio.ensure_future(
                asyncio.to_thread(
                    random_adapter, shapes, rank, seed + content, targets, dtype, alpha
                )
            )
            if distinct < count:
                made[content] = task  # reused later: keep it
        return await task

    async def one(client: httpx.AsyncClient, key: str, index: int, name: str) -> None:
        async with semaphore:
            config, weights = await files(index)
            try:
                response = await client.post(
                    f"{base_url.rstrip('/')}/v1/adapters",
                    data={"name": name, "replace": "true" if replace else "false"},
                    files={
                        "config": ("adapter_config.json", config, "application/json"),
                        "weights": (
                            "adapter_model.safetensors",
                            weights,
                            "application/octet-stream",
                        ),
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
            except httpx.HTTPError as exc:
                report.failed[type(exc).__name__] += 1
                report.messages.append(f"{name}: {exc!r}")
                return
            report.bytes_sent += len(config) + len(weights)
            if response.status_code == 201:
                report.uploaded += 1
            elif response.status_code == 409 and not replace:
                report.existed += 1
            else:
                report.failed[str(response.status_code)] += 1
                if len(report.messages) < 5:
                    report.messages.append(f"{name}: {response.text[:300]}")

    names = adapter_names(prefix, count, start)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.gather(
            *(
                one(client, key, start + i, name)
                for key in api_keys
                for i, name in enumerate(names)
            )
        )
    report.seconds = time.perf_counter() - started
    return report
