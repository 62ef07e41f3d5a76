"""ServeSettings: every `loraplex serve` option, from CLI > LORAPLEX_* env > config file > defaults.

Part of the composition root with cli.py: nothing below it reads flags or environment variables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

_FILE_SOURCES = {
    ".toml": TomlConfigSettingsSource,
    ".yaml": YamlConfigSettingsSource,
    ".yml": YamlConfigSettingsSource,
    ".json": JsonConfigSettingsSource,
}


class ServeSettings(BaseSettings):
    """Options of `loraplex serve`; each is also LORAPLEX_<NAME> and a key of the config file."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")

    model: Path | None = Field(
        default=None,
        description="base model: a Hugging Face checkpoint directory (default: the demo)",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=1, le=65535, description="port to listen on")
    data_dir: Path = Field(
        default=Path(".loraplex/data"),
        description="registry database and adapter files",
    )
    served_model_name: str | None = Field(
        default=None,
        description="the base model's name in the API (default: the directory name)",
    )
    max_loras: int = Field(default=8, ge=1, description="adapter slots on the device")
    max_cpu_loras: int = Field(
        default=64, ge=1, description="adapters kept in host memory"
    )
    max_lora_rank: int = Field(
        default=64, ge=1, le=512, description="largest adapter rank accepted"
    )
    max_num_seqs: int = Field(
        default=64, ge=1, description="requests in one batch at most"
    )
    max_model_len: int = Field(
        default=0, ge=0, description="context length (0 = the model's own limit)"
    )
    max_upload_bytes: int = Field(
        default=1 << 30,
        ge=1024,
        description="largest adapter upload accepted, in bytes",
    )
    max_queued_requests: int = Field(
        default=256, ge=0, description="requests waiting beyond the batch before 503"
    )
    max_concurrent_per_tenant: int = Field(
        default=64, ge=1, description="a tenant's calls running or waiting before 429"
    )
    tenant_token_rate: float = Field(
        default=0.0,
        ge=0,
        description="prompt + max_tokens tokens per second per tenant before 429 "
        "(0: no limit)",
    )
    tenant_token_burst: int = Field(
        default=0,
        ge=0,
        description="tokens a tenant may save up (0: ten seconds of the rate)",
    )
    adapter_load_workers: int = Field(
        default=4,
        ge=1,
        le=64,
        description="threads loading adapters from disk at once (read, checks, copies)",
    )
    adapter_wait_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a call waits for an adapter slot before 503",
    )
    shutdown_timeout: float = Field(
        default=30.0,
        ge=0,
        description="seconds in-flight requests get to finish on SIGTERM",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's CPU threads in the server; default 1 when the engine runs "
        "on a GPU (its CPU work is adapter checks and copies, and every thread that "
        "does torch CPU work gets a pool of this many), torch's own default on a CPU",
    )
    switch_interval_ms: float = Field(
        default=5.0,
        gt=0,
        le=100,
        description="the interpreter's thread switch interval (sys.setswitchinterval), "
        "in ms: the longest the engine thread waits for the interpreter lock while the "
        "HTTP thread holds it; Python's default is 5",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="reuse the KV cache of repeated prompt prefixes "
        "(per adapter content and tenant)",
    )
    share_base_prefix_across_tenants: bool = Field(
        default=False,
        description="let tenants share the cached KV of base-model prompts "
        "(timing can reveal another tenant's prompts)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="weights and activations"
    )
    quantization: Literal["none", "fp8"] = Field(
        default="none",
        description="fp8: quantize the base model's linear layers at load "
        "(an engine directory of loraplex build is FP8 already)",
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:N or auto")
    enforce_eager: bool = Field(
        default=False,
        description="no CUDA graphs and no torch.compile (faster start, slower decode)",
    )
    mixed_graph_max_tokens: int | None = Field(
        default=None,
        ge=0,
        description="steps that carry prompt chunks, of up to this many tokens, replay CUDA "
        "graphs captured for token buckets instead of launching each kernel from Python; "
        "0: they run eagerly; default: 4096 on one GPU, 0 under tensor parallelism",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="share of the GPU's memory the engine may fill; the KV cache gets "
        "what weights, adapter slots and activations leave",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs the model is split over (one worker process each; "
        "attention heads, MLP and vocabulary split, adapters sharded to match)",
    )
    load_format: Literal["auto", "dummy"] = Field(
        default="auto",
        description="auto: the checkpoint's weights; dummy: random weights of its "
        "shapes (benchmarks; only config.json and the tokenizer are read)",
    )
    replicas: int = Field(
        default=0,
        ge=0,
        description="engine replicas under Ray Serve, routed by adapter "
        "(0: one engine in this process)",
    )
    replica_autoscaling: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve autoscaling_config as JSON, e.g. "
        '{"min_replicas": 1, "max_replicas": 4}; Ray then decides the replica count',
    )
    ray_address: str | None = Field(
        default=None,
        description="the Ray cluster of the replicas: HOST:PORT, or local for a new "
        "one (unset: the one ray start runs on this host, else a new one)",
    )
    gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per replica (unset: 1 if the Ray cluster has GPUs and "
        "--device is not cpu, else 0)",
    )
    cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs per replica")
    admin_key: SecretStr | None = Field(
        default=None,
        description="the admin API key (default: generated at first start)",
    )
    config: Path | None = Field(
        default=None, description="a TOML, YAML or JSON file of options"
    )

    @field_validator("replica_autoscaling", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        # Flags and environment variables give JSON text; config files give a table.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_replica_count(self) -> ServeSettings:
        if self.replicas and self.replica_autoscaling:
            raise ValueError(
                "give --replicas (a fixed count) or --replica-autoscaling, not both"
            )
        return self

    @property
    def uses_replicas(self) -> bool:
        """Whether engines run as Ray Serve replicas rather than in this process."""
        return self.replicas > 0 or self.replica_autoscaling is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges env and file itself, to put them in the documented order.
        return (init_settings,)


def load_settings(
    cli_options: dict[str, Any], environ: dict[str, str]
) -> ServeSettings:
    """CLI options (only those given) > LORAPLEX_* variables > the config file > defaults.

    :raises ValueError: an unknown option in the file, a value out of range, an unreadable file.
    """
    config_file = cli_options.get("config") or environ.get("LORAPLEX_CONFIG")
    from_file: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        source_class = _FILE_SOURCES.get(path.suffix.lower())
        if source_class is None:
            raise ValueError(
                f"config file {path} must end in .toml, .yaml, .yml or .json"
            )
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        from_file = source_class(ServeSettings, path)()
        unknown = set(from_file) - set(ServeSettings.model_fields)
        if unknown:
            raise ValueError(
                f"config file {path}: unknown option(s) {', '.join(sorted(unknown))}"
            )
    env = {
        name: environ[f"LORAPLEX_{name.upper()}"]
        for name in ServeSettings.model_fields
        if f"LORAPLEX_{name.upper()}" in environ
    }
    return ServeSettings(**{**from_file, **env, **cli_options})
