"""Run a benchmark: send the workload at its arrival times (or at a fixed concurrency), time
every request, and summarise.

    from loraplex.loadgen import BenchConfig, WorkloadConfig, run_benchmark
    result = run_benchmark(BenchConfig("http://127.0.0.1:8000", ("KEY",),
                                       WorkloadConfig(request_rate=4.0), num_requests=200))
    print(result.table())
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from .client import RequestRecord, request_body, send
from .report import format_table, summarize
from .workload import WorkloadConfig, generate, popularity_weights


@dataclass(frozen=True)
class BenchConfig:
    """One run: where, as whom, what (the workload), how much and how fast."""

    base_url: str
    api_keys: tuple[str, ...]
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    num_requests: int | None = 100  # None: until `duration_s`
    duration_s: float | None = None
    max_concurrency: int | None = None
    goodput: dict[str, float] = field(default_factory=dict)  # metric → ms
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0
    progress: bool = True
    save_itl: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        if not self.api_keys:
            raise ValueError("at least one API key is needed")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a number of requests or a duration")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be >= 1")
        unbounded = math.isinf(self.workload.request_rate) and not self.max_concurrency
        if self.num_requests is None and unbounded:
            raise ValueError("a run by duration needs a request rate or a concurrency")
        w = self.workload
        if not 0 <= w.cold_share + w.base_share <= 1:
            raise ValueError("cold share + base share must be within [0, 1]")
        if w.cold_share > 0 and not w.cold_adapters:
            raise ValueError("a cold share needs cold adapters")
        popularity_weights(w.popularity, 1)  # raises on an unknown preset
        if w.request_rate <= 0:
            raise ValueError("the request rate must be > 0 (inf: all at once)")


@dataclass
class BenchResult:
    """The records of every request, and the figures computed from them."""

    config: BenchConfig
    summary: dict
    records: list[RequestRecord]
    started_at: float

    def table(self) -> str:
        return format_table(self.summary, self.config.label or "Serving benchmark")

    def to_json(self) -> dict:
        config = dataclasses.asdict(self.config)
        config["api_keys"] = len(self.config.api_keys)  # never write keys to a file
        config["workload"].pop("dataset", None)
        for name in ("prompt_len", "output_len"):
            config["workload"][name] = str(getattr(self.config.workload, name))
        return {
            "date": time.strftime(
                "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_at)
            ),
            "client_host": platform.node(),
            "config": _finite(config),
            "summary": self.summary,
            "records": [r.to_json(self.config.save_itl) for r in self.records],
        }

    def write_json(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _finite(value):
    """JSON has no infinity: an unlimited rate is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run `config` to the end (blocking)."""
    return asyncio.run(arun(config))


async def base_model_name(client: httpx.AsyncClient, base_url: str, key: str) -> str:
    """The served base model: the entry of /v1/models without a parent."""
    response = await client.get(
        f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    response.raise_for_status()
    for card in response.json()["data"]:
        if not card.get("parent"):
            return card["id"]
    raise ValueError(f"{base_url}/v1/models lists no base model")


async def arun(config: BenchConfig) -> BenchResult:
    """Run `config` in the running event loop."""
    base_url = config.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        workload = config.workload
        needs_base = not workload.adapters or workload.base_share > 0
        if needs_base and not workload.base_model:
            name = await base_model_name(client, base_url, config.api_keys[0])
            workload = dataclasses.replace(workload, base_model=name)
        workload = dataclasses.replace(workload, num_tenants=len(config.api_keys))
        path = (
            "/v1/chat/completions" if workload.endpoint == "chat" else "/v1/completions"
        )
        options = {"temperature": config.temperature, "ignore_eos": config.ignore_eos}
        records, started, duration = await _drive(
            client, base_url + path, config, workload, options
        )
    summary = summarize(records, duration, config.goodput)
    return BenchResult(config, summary, records, started)


async def _drive(client, url, config: BenchConfig, workload, options):
    records: list[RequestRecord] = []
    bar = tqdm(
        total=config.num_requests,
        disable=not config.progress,
        unit="req",
        dynamic_ncols=True,
    )
    semaphore = asyncio.Semaphore(config.max_concurrency or 1)
    running: set[asyncio.Task] = set()

    async def one(spec) -> None:
        try:
            body = request_body(spec, workload.endpoint, options)
            key = config.api_keys[spec.tenant]
            records.append(await send(client, url, key, spec, body, start))
        finally:
            if config.max_concurrency:
                semaphore.release()
            bar.update(1)

    wall = time.time()
    start = time.perf_counter()
    deadline = start + config.duration_s if config.duration_s else math.inf
    for spec in generate(workload, config.num_requests):
        delay = start + spec.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if config.max_concurrency:
            await semaphore.acquire()
        if time.perf_counter() >= deadline:
            if config.max_concurrency:
                semaphore.release()
            break
        task = asyncio.create_task(one(spec))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    duration = time.perf_counter() - start
    bar.close()
    records.sort(key=lambda r: r.index)
    return records, wall, duration
