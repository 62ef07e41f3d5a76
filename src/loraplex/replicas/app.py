"""Engine replicas under Ray Serve: `loraplex serve --replicas N`, and an importable app.

Two ways to run the same parts:

- `build_replica_server` (the CLI): the API front runs in this process under uvicorn, as
  without replicas (drain on SIGTERM, banner, demo tenant), and the engines are a Ray Serve
  application of its own on a local Ray cluster or the one at `--ray-address`.
- `build_app` (operators' clusters): `serve run loraplex.replicas.app:build_app model=DIR
  data_dir=DIR replicas=2` deploys the front as a Serve ingress deployment (one replica,
  on the head node by default, where `data_dir` lives) beside the engine deployment.

Either way the front is one process, the registry's one writer; each engine replica owns an
engine, an engine thread and a tiered adapter pool (EngineReplica).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from loraplex.adapters_registry import PoolConfig, RegistryServices
from loraplex.api import ApiState, TextProcessor, create_app
from loraplex.api.metrics import ApiMetrics
from loraplex.api.registry_bridge import RegistryAuthenticator
from loraplex.serve import Server, admin_keys, api_config, open_registry
from loraplex.serve_settings import ServeSettings

from .board import FleetView, open_board
from .client import ReplicaClient
from .front import AdapterPayloads, FleetPool, ReplicaResolver
from .replica import EngineReplica
from .wire import ENGINE_DEPLOYMENT, FRONT_DEPLOYMENT, ReplicaFacts

log = logging.getLogger("loraplex.replicas")
APP_NAME = "loraplex"  # the Serve application of `loraplex serve --replicas`


@dataclass
class ReplicaServer(Server):
    """A Server whose engines are Ray Serve replicas; closing it removes them."""

    view: FleetView | None = None
    app_name: str = APP_NAME
    deletes_app: bool = False  # the CLI's own application: delete it on close
    owns_ray: bool = False  # Ray was started here: shut it down on close

    def close(self) -> None:
        super().close()
        if self.view is not None:
            self.view.stop()
        if self.deletes_app:
            serve.delete(self.app_name)
        if self.owns_ray:
            serve.shutdown()
            ray.shutdown()


def replica_count(settings: ServeSettings) -> int:
    """Replicas at most: the fixed count, or the autoscaler's maximum."""
    if settings.replica_autoscaling is not None:
        auto = settings.replica_autoscaling
        return int(auto.get("max_replicas", auto.get("min_replicas", 1)) or 1)
    return max(1, settings.replicas)


def engine_options(settings: ServeSettings, num_gpus: float) -> dict[str, Any]:
    """The engine deployment's Ray Serve options (the replica count or autoscaling)."""
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        # A full batch per replica; more calls wait at the router, which may then send
        # them to a replica without the adapter rather than queue behind a busy one.
        "max_ongoing_requests": settings.max_num_seqs,
        "ray_actor_options": {
            "num_cpus": settings.cpus_per_replica,
            "num_gpus": num_gpus,
        },
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        # A line per call in every replica's log, and on the CLI's terminal: the front's
        # metrics count calls already.
        "logging_config": {"enable_access_log": False},
    }
    if settings.replica_autoscaling is not None:
        options["autoscaling_config"] = settings.replica_autoscaling
    else:
        options["num_replicas"] = max(1, settings.replicas)
    return options


def engine_application(settings: ServeSettings, model: Path, num_gpus: float):
    """The engine deployment, bound: N replicas (or Ray's autoscaling) of EngineReplica."""
    deployment = serve.deployment(EngineReplica, **engine_options(settings, num_gpus))
    # Replicas never need the admin key; it stays with the front.
    replica_settings = settings.model_copy(update={"admin_key": None})
    return deployment.bind(replica_settings, str(model))


def build_front(
    settings: ServeSettings,
    model: Path,
    handle,
    facts: ReplicaFacts,
    view: FleetView,
) -> ReplicaServer:
    """The API front over the engine deployment's handle (the registry's one writer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    registry = open_registry(settings, facts.spec, facts.max_lora_rank)
    pool = FleetPool(
        view,
        AdapterPayloads(registry, settings.max_cpu_loras),
        handle,
        PoolConfig(max_loras=facts.max_loras, max_cpu_loras=settings.max_cpu_loras),
    )
    resolver = ReplicaResolver(registry, pool)
    services = RegistryServices(registry, pool)
    admin, generated = admin_keys(settings)
    name = settings.served_model_name or Path(model).name
    client = ReplicaClient(handle, view)
    metrics = ApiMetrics(name)
    metrics.watch_engine(client.stats, resolver.slot_names, facts.max_loras)
    metrics.watch_pool(pool)
    max_num_seqs = facts.max_num_seqs * replica_count(settings)
    state = ApiState(
        config=api_config(settings, name, facts.max_model_len, max_num_seqs),
        client=client,
        text=TextProcessor(tokenizer),
        resolver=resolver,
        authenticator=RegistryAuthenticator(registry, admin),
        metrics=metrics,
        registry=services,
    )
    app = create_app(state, max_body_bytes=settings.max_upload_bytes + (1 << 20))
    # The admin web UI reads one local engine (memory split, slot grid); with replicas
    # the admin JSON API (/admin/api) and /metrics show the fleet instead.
    scaling = "autoscaling" if settings.replica_autoscaling else "fixed"
    summary = (
        f"{replica_count(settings)} engine replica(s) under Ray Serve ({scaling}), "
        f"engines on {facts.device}; admin web UI off with replicas"
    )
    banner = [summary]
    if generated:
        banner.append(f"admin key (shown once, stored hashed): {generated}")
    server = ReplicaServer(settings, state, app, services, None, banner, view=view)
    server.start_collector()
    return server


def default_gpus(settings: ServeSettings, cluster_gpus: float) -> float:
    """GPUs per replica: the setting, else one when there are GPUs and the device allows."""
    if settings.gpus_per_replica is not None:
        return settings.gpus_per_replica
    return 1.0 if settings.device != "cpu" and cluster_gpus >= 1 else 0.0


def build_replica_server(
    settings: ServeSettings, model: Path, say: Callable[[str], None] = print
) -> ReplicaServer:
    """`loraplex serve --replicas N`: engines on Ray, the front here (see the module doc)."""
    owns_ray = not ray.is_initialized()
    if owns_ray:
        say(f"connecting to Ray ({settings.ray_address or 'a new local cluster'})")
        ray.init(address=settings.ray_address)
    # Calls reach the replicas through handles from this process: no Serve HTTP proxy.
    serve.start(proxy_location="Disabled")
    view = FleetView(open_board(APP_NAME))
    gpus = default_gpus(settings, ray.cluster_resources().get("GPU", 0))
    say(f"starting {replica_count(settings)} engine replica(s), {gpus:g} GPU(s) each")
    handle = serve.run(
        engine_application(settings, model, gpus), name=APP_NAME, route_prefix=None
    )
    facts = handle.describe.remote().result()
    view.start()
    view.wait_for(1, timeout_s=30)
    server = build_front(settings, model, handle, facts, view)
    server.deletes_app, server.owns_ray = True, owns_ray
    return server


class Front:
    """The front as a Serve ingress deployment (`build_app`): one replica, the registry's
    one writer; its FastAPI app is the one `loraplex serve` runs."""

    async def __init__(self, settings: ServeSettings, model: str, engine) -> None:
        import asyncio

        app_name = serve.get_replica_context().app_name
        view = FleetView(open_board(app_name))
        facts = await engine.describe.remote()
        await asyncio.to_thread(view.start)
        self.server = build_front(settings, Path(model), engine, facts, view)
        self.server.app_name = app_name
        for line in self.server.banner:
            log.warning(line)

    def __serve_build_asgi_app__(self):
        return self.server.app

    def __del__(self) -> None:
        self.server.close()


def build_app(args: dict[str, Any] | ServeSettings):
    """The importable Ray Serve application: `serve run loraplex.replicas.app:build_app
    model=DIR data_dir=DIR replicas=2` (any `loraplex serve` option as key=value).

    The front is placed on the head node (override with the Front deployment's
    `ray_actor_options` in a Serve config file); each engine replica takes
    `gpus_per_replica` GPUs (default 1, or 0 with device=cpu).
    """
    settings = args if isinstance(args, ServeSettings) else ServeSettings(**args)
    if settings.model is None:
        raise ValueError("build_app needs model=DIR (a checkpoint on every node)")
    if not settings.uses_replicas:
        settings = settings.model_copy(update={"replicas": 1})
    gpus = default_gpus(settings, cluster_gpus=1.0)
    engine = engine_application(settings, settings.model, gpus)
    front = serve.deployment(
        serve.ingress()(Front),
        name=FRONT_DEPLOYMENT,
        num_replicas=1,  # the registry has one writer
        max_ongoing_requests=max(1000, settings.max_queued_requests * 4),
        ray_actor_options={
            "num_cpus": 1,
            "resources": {"node:__internal_head__": 0.001},
        },
    )
    return front.bind(settings, str(settings.model), engine)
