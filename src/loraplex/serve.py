"""`loraplex serve`: build the engine, the registry, the pool and the API, then run uvicorn.

Part of the composition root: it takes ServeSettings and wires explicit config objects into
every layer. SIGTERM drains: readiness turns 503, new requests get 503, requests in flight get
`shutdown_timeout` seconds to finish, the rest are aborted, and the process exits 0.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from loraplex.adapters_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterNotFound,
    AdapterRegistry,
    AdminKeyStore,
    EngineThreadSlotWriter,
    PoolConfig,
    RegistryConfig,
    RegistryServices,
    TenantNotFound,
    UploadLimits,
    UploadPart,
)
from loraplex.admin_ui import AdminUiState, mount_admin_ui
from loraplex.api import ApiConfig, ApiState, EngineClient, TextProcessor, create_app
from loraplex.api.metrics import ApiMetrics
from loraplex.api.registry_bridge import RegistryAuthenticator, RegistryResolver
from loraplex.platform import Engine, EngineConfig, EngineThread, ModelSpec

from .serve_settings import ServeSettings

log = logging.getLogger("loraplex.serve")
DEMO_TENANT = "demo"


@dataclass
class Server:
    """Everything `loraplex serve` runs, and how to take it down."""

    settings: ServeSettings
    state: ApiState
    app: object
    services: RegistryServices
    engine_thread: EngineThread | None  # None: the engines are Ray Serve replicas
    banner: list[str]
    stop_collector: threading.Event = field(default_factory=threading.Event)

    def start_collector(self, interval_s: float = 10.0) -> None:
        """Remove superseded and deleted adapter versions once no request uses them."""

        def loop() -> None:
            while not self.stop_collector.wait(interval_s):
                try:
                    self.services.collect()
                except Exception:  # the next round retries; never take the server down
                    log.exception("adapter collection failed")

        threading.Thread(target=loop, name="loraplex-collect", daemon=True).start()

    def close(self) -> None:
        self.stop_collector.set()
        if self.engine_thread is not None:
            self.engine_thread.stop()
        self.services.pool.close()
        self.services.registry.close()


def build_server(
    settings: ServeSettings, model: Path, say: Callable[[str], None] = print
) -> Server:
    """Wire every layer from the settings; `model` is a checkpoint directory or an engine
    directory of `loraplex build` (whose engine.json supplies the limits not set here)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    engine = Engine(
        engine_config(settings, model), tokenizer=tokenizer.backend_tokenizer
    )
    limit_cpu_threads(settings, engine.device)
    thread = EngineThread(engine).start()
    # An engine directory's max_lora_rank, maybe, rather than the settings'.
    registry = open_registry(settings, engine.spec, engine.config.max_lora_rank)
    pool = registry.make_pool(
        PoolConfig(
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            dtype=engine.dtype,
            device=str(engine.device),
            acquire_timeout_s=settings.adapter_wait_timeout,
            load_workers=settings.adapter_load_workers,
        ),
        EngineThreadSlotWriter(thread),
    )
    services = RegistryServices(registry, pool)
    admin, generated = admin_keys(settings)
    name = settings.served_model_name or Path(model).name
    resolver = RegistryResolver(registry, pool)
    metrics = ApiMetrics(name)
    metrics.watch_engine(thread.stats, resolver.slot_names, settings.max_loras)
    metrics.watch_pool(pool)
    state = ApiState(
        config=api_config(
            settings, name, engine.max_model_len, engine.config.max_num_seqs
        ),
        client=EngineClient(thread),
        text=TextProcessor(tokenizer),
        resolver=resolver,
        authenticator=RegistryAuthenticator(registry, admin),
        metrics=metrics,
        registry=services,
    )
    # The body cap leaves room for multipart framing around an upload of the largest size.
    app = create_app(state, max_body_bytes=settings.max_upload_bytes + (1 << 20))
    # The admin UI is the API's sibling: it gets what it reads from the API layer as values.
    mount_admin_ui(
        app,
        AdminUiState(
            services=services,
            engine_thread=thread,
            metrics_registry=metrics.registry,
            admin_keys=admin,
            model_name=name,
            started_at=state.started_at,
            is_draining=lambda: state.draining,
            max_upload_bytes=settings.max_upload_bytes,
        ),
    )
    banner = [] if engine.built is None else [engine.built.summary()]
    if generated:
        banner.append(f"admin key (shown once, stored hashed): {generated}")
    server = Server(settings, state, app, services, thread, banner)
    server.start_collector()
    return server


def limit_cpu_threads(settings: ServeSettings, device) -> None:
    """Set torch's CPU threads (settings.cpu_threads; 1 beside a GPU). An OpenMP pool
    belongs to the thread that runs the op: the request threads that check, copy and pack
    adapters would each grow one of torch's default size (the CPU count)."""
    import torch

    threads = settings.cpu_threads or (1 if device.type == "cuda" else None)
    if threads is not None:
        torch.set_num_threads(threads)


def engine_config(settings: ServeSettings, model: Path) -> EngineConfig:
    """The engine's options from the settings (engine replicas build theirs with it too)."""
    return EngineConfig(
        model=str(model),
        dtype=settings.dtype,
        device=settings.device,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        quantization=settings.quantization,
        enable_prefix_caching=settings.enable_prefix_caching,
        load_format=settings.load_format,
        enforce_eager=settings.enforce_eager,
        mixed_graph_max_tokens=settings.mixed_graph_max_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
    )


def open_registry(
    settings: ServeSettings, spec: ModelSpec, max_lora_rank: int
) -> AdapterRegistry:
    """The registry of `settings.data_dir`, accepting adapters that fit `spec`."""
    return AdapterRegistry(
        RegistryConfig(
            data_dir=settings.data_dir,
            max_lora_rank=max_lora_rank,
            limits=UploadLimits(
                max_upload_bytes=settings.max_upload_bytes,
                max_weights_bytes=settings.max_upload_bytes,
            ),
        ),
        spec,
    )


def admin_keys(settings: ServeSettings) -> tuple[AdminKeyStore, str | None]:
    """The admin key store, and the key generated at first start (None otherwise)."""
    admin = AdminKeyStore(settings.data_dir)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    return admin, admin.ensure(admin_key)


def api_config(
    settings: ServeSettings, name: str, max_model_len: int, max_num_seqs: int
) -> ApiConfig:
    """The HTTP API's limits; `max_num_seqs`: requests that run at once, all engines."""
    return ApiConfig(
        served_model_name=name,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_queued_requests=settings.max_queued_requests,
        share_base_prefix_across_tenants=settings.share_base_prefix_across_tenants,
        max_concurrent_per_tenant=settings.max_concurrent_per_tenant,
        tenant_token_rate=settings.tenant_token_rate,
        tenant_token_burst=settings.tenant_token_burst,
        adapter_wait_s=settings.adapter_wait_timeout,
    )


def bootstrap_demo(server: Server, adapters: dict[str, Path]) -> str:
    """Create the demo tenant, upload the demo adapters through the tenant ingest path, and
    issue a fresh demo key (older demo keys are revoked, since a key is shown only once)."""
    registry = server.services.registry
    try:
        tenant = registry.tenants.by_name(DEMO_TENANT)
    except TenantNotFound:
        tenant = registry.tenants.create(DEMO_TENANT)
    for name, directory in adapters.items():
        try:
            registry.resolve(tenant.id, name)
            continue
        except AdapterNotFound:
            pass
        with (
            (directory / ADAPTER_CONFIG).open("rb") as cfg,
            (directory / ADAPTER_WEIGHTS).open("rb") as weights,
        ):
            registry.ingest(
                tenant.id,
                name,
                [UploadPart(ADAPTER_CONFIG, cfg), UploadPart(ADAPTER_WEIGHTS, weights)],
            )
    for key in registry.tenants.api_keys(tenant.id):
        if key.revoked_at is None and key.label == "demo":
            registry.tenants.revoke_api_key(key.id)
    key, _ = registry.tenants.create_api_key(tenant.id, "demo")
    return key


def usage_banner(server: Server, tenant_key: str, adapter: str) -> list[str]:
    """A curl line and an openai snippet that work as pasted."""
    s = server.settings
    base = f"http://{s.host}:{s.port}"
    body = (
        f'{{"model": "{adapter}", '
        '"messages": [{"role": "user", "content": "Who are you?"}]}'
    )
    curl = (
        f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {tenant_key}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    return [
        f"demo tenant key: {tenant_key}",
        "try it with curl:",
        curl,
        "or with the openai client (python3 - <<'EOF' ... EOF):",
        "from openai import OpenAI",
        f"client = OpenAI(base_url='{base}/v1', api_key='{tenant_key}')",
        "messages = [{'role': 'user', 'content': 'Who are you?'}]",
        f"reply = client.chat.completions.create(model='{adapter}', messages=messages)",
        "print(reply.choices[0].message.content)",
    ]


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before shutdown on the first SIGTERM/SIGINT (a second forces)."""

    def __init__(
        self, config: uvicorn.Config, state: ApiState, timeout_s: float
    ) -> None:
        super().__init__(config)
        self.api = state
        self.timeout_s = timeout_s
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.api.draining = True
        log.warning("draining: up to %.0f s for requests in flight", self.timeout_s)
        threading.Thread(target=self._drain, name="loraplex-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.05)
        if self._busy():
            log.warning("drain timeout: aborting the requests still running")
        self.api.client.stop()  # what is left ends with finish_reason "abort"
        time.sleep(0.2)  # let the aborted streams send their last chunk
        self.should_exit = True

    def _busy(self) -> bool:
        return (
            self.api.client.num_active > 0
            or sum(self.api.active_by_tenant.values()) > 0
        )


def run(server: Server) -> None:
    s = server.settings
    # The engine thread and the HTTP thread share one interpreter lock; a thread that
    # wants it back (a step's host work after a GPU wait) waits up to this interval.
    sys.setswitchinterval(s.switch_interval_ms / 1e3)
    config = uvicorn.Config(
        server.app,
        host=s.host,
        port=s.port,
        log_level="info",
        access_log=False,
        # Named, not "auto": without them uvicorn would run asyncio's loop and h11 silently,
        # and the engine thread would lose a seventh of its time handing out tokens.
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=5,
    )
    try:
        DrainingServer(config, server.state, s.shutdown_timeout).run()
    finally:
        server.close()
