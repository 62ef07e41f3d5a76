"""The engine directory that `loraplex build` writes and the engine loads without re-quantizing.

    DIR/engine.json                   format version, engine config, GPU record, quality gate,
                                      the weight files with their sizes
    DIR/config.json, tokenizer files  copied from the checkpoint
    DIR/weights-0000N.safetensors     the model's own tensor names: e4m3 `*.weight` with float32
                                      `*.weight_scale` of the linears, the rest in the dtype

Opening checks everything that is cheap to check before a byte of weight is read: the JSON, the
format version, the files and their sizes, and the GPU (an engine is built for one compute
capability). Written into a temporary sibling directory, fsynced, then renamed: a directory with
the final name is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .config import EngineConfig
from .errors import ModelLoadError

ENGINE_JSON = "engine.json"
FORMAT_VERSION = 1
# Serving may lower these below what the engine was built for, never raise them.
BUILT_LIMITS = ("max_num_seqs", "max_model_len", "max_lora_rank")
BUILT_EXACT = ("quantization", "dtype")
SHARD_BYTES = 4 << 30
_CHECKPOINT_ONLY = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
_REQUIRED = ("format_version", "engine", "gpu", "quality_gate", "weights")


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / ENGINE_JSON).is_file()


def device_record(device: torch.device) -> dict[str, Any]:
    """What an engine is built for: the device, its name and compute capability."""
    if device.type != "cuda":
        return {"device_type": device.type, "name": device.type, "capability": None}
    return {
        "device_type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
    }


@dataclasses.dataclass(frozen=True)
class BuiltEngine:
    """An opened, checked engine directory."""

    root: Path
    record: dict[str, Any]

    @property
    def engine(self) -> dict[str, Any]:
        return self.record["engine"]

    @property
    def quality_gate(self) -> dict[str, Any]:
        return self.record["quality_gate"]

    def resolve(self, config: EngineConfig) -> EngineConfig:
        """`config` with what the engine fixes filled in; values left at EngineConfig's
        defaults take the built ones, a lower limit is kept, anything else is refused."""
        defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
        changes: dict[str, Any] = {}
        for name in BUILT_LIMITS + BUILT_EXACT:
            built, asked = self.engine[name], getattr(config, name)
            if asked in (defaults[name], "auto"):
                changes[name] = built
            elif name in BUILT_EXACT and asked != built:
                raise ModelLoadError(
                    f"{self.root} was built with {name}={built}; it cannot run with "
                    f"{name}={asked} (rebuild it with loraplex build)"
                )
            elif name in BUILT_LIMITS and asked > built:
                flag = "--" + name.replace("_", "-")
                raise ModelLoadError(
                    f"{name}={asked} exceeds the {built} that {self.root} was built for; "
                    f"serve with {flag} {built} or less, or rebuild with {flag} {asked}"
                )
        if config.load_format != "auto":
            raise ModelLoadError(
                f"{self.root} is an engine directory: it holds its weights "
                f"(load_format {config.load_format!r} does not apply)"
            )
        return dataclasses.replace(config, **changes)

    def check_device(self, device: torch.device) -> None:
        """Refuse to run on another kind of device or GPU generation than the build's."""
        built, here = self.record["gpu"], device_record(device)
        if (built["device_type"], built["capability"]) != (
            here["device_type"],
            here["capability"],
        ):
            raise ModelLoadError(
                f"{self.root} was built for {_describe(built)}; this engine runs on "
                f"{_describe(here)}: rebuild it here with loraplex build"
            )

    def summary(self) -> str:
        """One line with the build's device, date and quality-gate figures."""
        gate = self.quality_gate
        return (
            f"{self.engine['quantization']} engine {self.root.name} built "
            f"{self.record['built_at'][:10]} for {_describe(self.record['gpu'])}; "
            f"quality gate vs {gate['reference_dtype']}: top-1 agreement "
            f"{100 * gate['top1_agreement']:.1f}%, mean KL {gate['mean_kl']:.2e} "
            f"over {gate['positions']} positions"
        )

    def load_weights(self, model: torch.nn.Module, progress: bool = False) -> None:
        """Copy the stored tensors into `model` (built with the same quantization): strict
        names, shapes and dtypes, no quantization. A tensor-parallel rank's model takes its
        shard of each (read on the host, cut, then copied to its device)."""
        expected = model_tensors(model)
        seen: set[str] = set()
        split = getattr(getattr(model, "tp", None), "enabled", False)
        device = "cpu" if split else str(next(model.parameters()).device)
        bar = tqdm(total=len(expected), desc="loading engine", disable=not progress)
        for entry in self.record["weights"]:
            path = self.root / entry["file"]
            try:
                with safe_open(str(path), framework="pt", device=device) as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        tensor = f.get_tensor(name)
                        if split and name in expected:
                            tensor = model.shard_of(name, tensor)
                        _copy(expected, name, tensor, path)
                        seen.add(name)
                        bar.update()
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise ModelLoadError(f"{path} is not readable: {exc}") from None
        bar.close()
        missing = sorted(set(expected) - seen)
        if missing:
            raise ModelLoadError(
                f"{self.root} lacks tensor(s) {', '.join(missing[:3])}"
            )


def open_engine_dir(path: str | Path) -> BuiltEngine | None:
    """The checked engine directory at `path`, or None when `path` holds no engine.json.

    :raises ModelLoadError: corrupt engine.json, another format version, missing or truncated
        files (the message names what is wrong and says to rebuild).
    """
    root = Path(path)
    file = root / ENGINE_JSON
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc}): rebuild") from None
    missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise ModelLoadError(f"{file} lacks {', '.join(missing)}: rebuild the engine")
    if record["format_version"] != FORMAT_VERSION:
        raise ModelLoadError(
            f"{file} has format version {record['format_version']!r}; this loraplex reads "
            f"version {FORMAT_VERSION}: rebuild the engine with this loraplex"
        )
    if not (root / "config.json").is_file():
        raise ModelLoadError(f"{root} lacks config.json: the engine is incomplete")
    for entry in record["weights"]:
        weights = root / entry["file"]
        if weights.parent != root or not weights.is_file():
            raise ModelLoadError(
                f"{root} lacks {entry['file']}: the engine is incomplete"
            )
        if weights.stat().st_size != entry["bytes"]:
            raise ModelLoadError(
                f"{weights} has {weights.stat().st_size} bytes, not the {entry['bytes']} "
                "written at build time: the engine is damaged, rebuild it"
            )
    return BuiltEngine(root, record)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of `model` by name: parameters and persistent buffers, a tied LM
    head once (as the embedding)."""
    tensors = dict(model.state_dict(keep_vars=True))
    if getattr(model.spec, "tie_word_embeddings", False):
        tensors.pop("lm_head_weight", None)
    return tensors


def write_engine_dir(
    out: Path,
    model: torch.nn.Module,
    record: dict[str, Any],
    source: Path,
    progress: bool = False,
) -> Path:
    """Write the engine directory atomically: temp sibling, fsync, rename onto `out`.

    :param record: engine.json without `weights` and `format_version` (added here).
    :raises FileExistsError: `out` exists already.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it first")
    with _temporary_sibling(out) as tmp:
        for item in sorted(Path(source).iterdir()):
            if item.is_file() and not _is_checkpoint_file(item.name):
                shutil.copyfile(item, tmp / item.name)
                _fsync(tmp / item.name)
        weights = _write_shards(tmp, model_tensors(model), progress)
        full = {"format_version": FORMAT_VERSION, **record, "weights": weights}
        (tmp / ENGINE_JSON).write_text(json.dumps(full, indent=2) + "\n")
        _fsync(tmp / ENGINE_JSON)
        _fsync(tmp)
        os.rename(tmp, out)
    _fsync(out.parent)
    return out


def _write_shards(
    root: Path, tensors: dict[str, torch.Tensor], progress: bool
) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    entries = []
    bar = tqdm(total=len(tensors), desc="writing engine", disable=not progress)
    for index, names in enumerate(shards, start=1):
        file = root / f"weights-{index:05d}-of-{len(shards):05d}.safetensors"
        host = {n: tensors[n].detach().contiguous().cpu() for n in names}
        save_file(host, str(file), metadata={"format": "pt"})
        del host
        _fsync(file)
        entries.append({"file": file.name, "bytes": file.stat().st_size})
        bar.update(len(names))
    bar.close()
    return entries


def _copy(
    expected: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, path: Path
) -> None:
    target = expected.get(name)
    if target is None:
        raise ModelLoadError(f"{path} holds tensor {name}, which this model lacks")
    if target.shape != tensor.shape or target.dtype != tensor.dtype:
        raise ModelLoadError(
            f"{path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the model "
            f"expects {tuple(target.shape)} {target.dtype}"
        )
    with torch.no_grad():
        target.copy_(tensor)


def _is_checkpoint_file(name: str) -> bool:
    return (
        name == ENGINE_JSON or name.endswith(_CHECKPOINT_ONLY) or "safetensors" in name
    )


def _describe(gpu: dict[str, Any]) -> str:
    if gpu["capability"] is None:
        return gpu["name"]
    major, minor = gpu["capability"]
    return f"{gpu['name']} (sm_{major}{minor})"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temporary_sibling(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an engine behind
        raise
