"""The soak's two drivers: Poisson traffic over the adapters that exist now, and the churn
that uploads, replaces and deletes adapters meanwhile.

Traffic picks each request's adapter when it is sent, from the live set: with probability
`churn_share` one of the churn adapters, else one of the stable ones (uniformly). The churn
keeps `window` churn adapters: each tick uploads a new one (new content) and deletes the
oldest, or (every third tick) replaces a live one with new content under the same name. A
deleted adapter leaves the live set first, and is deleted once every request already sent
to it has its first token (it holds its adapter from then on, and must finish normally):
so a 404 is never the benchmark's own race, and always counts as an error. Deleting while
those requests still stream is the point: the server must keep the files until they end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from loraplex.loadgen import BaseShapes, RequestRecord, RequestSpec, upload_adapters
from loraplex.loadgen.client import request_body, send

REFUSALS = ("429", "503")  # with Retry-After: backpressure, not a failure


@dataclass
class Tally:
    """What happened to the requests sent so far."""

    sent: int = 0
    ok: int = 0
    in_flight: int = 0
    skipped: int = 0  # arrivals not sent: max_in_flight were already in flight
    errors: Counter = field(default_factory=Counter)  # outcome → count
    refusals: Counter = field(default_factory=Counter)  # status → count
    messages: list[str] = field(default_factory=list)  # the first errors
    records: list[RequestRecord] = field(default_factory=list)

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        if record.ok:
            self.ok += 1
        elif record.outcome in REFUSALS and record.retry_after:
            self.refusals[record.outcome] += 1
        else:
            self.errors[record.outcome] += 1
            if len(self.messages) < 20:
                self.messages.append(
                    f"{record.model}: {record.outcome} {record.error[:200]}"
                )

    def counts(self) -> dict:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "refusals": sum(self.refusals.values()),
            "in_flight": self.in_flight,
            "skipped": self.skipped,
        }


@dataclass
class LiveSet:
    """The adapters requests may name now, and requests sent but not yet streaming."""

    stable: list[str]
    churn: list[str] = field(default_factory=list)  # oldest first
    before_first_token: Counter = field(default_factory=Counter)
    in_flight: Counter = field(default_factory=Counter)

    def pick(self, rng: random.Random, churn_share: float) -> tuple[str, str]:
        if self.churn and rng.random() < churn_share:
            return "churn", rng.choice(self.churn)
        return "stable", rng.choice(self.stable)


class Traffic:
    """Poisson arrivals at `rate` until `stop` is set; streamed completions of random ids."""

    def __init__(self, url, key, live: LiveSet, rate: float, args, seed: int) -> None:
        self.url, self.key, self.live, self.rate = url, key, live, rate
        self.prompt_len, self.output_len = args.prompt_len, args.output_len
        self.vocab, self.churn_share = args.vocab_size, args.churn_share
        self.max_in_flight, self.timeout_s = args.max_in_flight, args.request_timeout
        self.rng = random.Random(seed)
        self.tally = Tally()

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.timeout_s, connect=30.0)
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            start = time.perf_counter()
            arrival = 0.0
            while not stop.is_set():
                arrival += self.rng.expovariate(self.rate)
                delay = start + arrival - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                if self.tally.in_flight >= self.max_in_flight:
                    self.tally.skipped += 1
                    continue
                task = asyncio.create_task(self._one(client, start, arrival))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(self, client, start: float, arrival: float) -> None:
        kind, model = self.live.pick(self.rng, self.churn_share)
        prompt = [self.rng.randrange(self.vocab) for _ in range(self.prompt_len)]
        spec = RequestSpec(
            self.tally.sent, 0, model, kind, prompt, None, self.output_len, arrival
        )
        body = request_body(spec, "completions", {"temperature": 0, "ignore_eos": True})
        self.tally.sent += 1
        self.tally.in_flight += 1
        self.live.before_first_token[model] += 1
        self.live.in_flight[model] += 1
        waiting = True

        def streaming() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self.live.before_first_token[model] -= 1

        try:
            record = await send(
                client, f"{self.url}/v1/completions", self.key, spec, body, start,
                on_first_token=streaming,
            )  # fmt: skip
        finally:
            streaming()
            self.tally.in_flight -= 1
            self.live.in_flight[model] -= 1
        self.tally.add(record)


class Churn:
    """Uploads, replacements and deletions of the churn adapters, one every `every_s`."""

    def __init__(self, url, key, shapes: BaseShapes, live: LiveSet, args, t0: float):
        self.url, self.key, self.shapes, self.live = url, key, shapes, live
        self.rank, self.window, self.every_s = args.rank, args.window, args.churn_every
        self.grace_s, self.t0 = args.delete_grace, t0
        self.next_index = 0
        self.next_seed = 10_000  # new content each upload (the stable set: 0..distinct)
        self.rng = random.Random(5)
        self.ops: list[dict] = []

    @property
    def failed(self) -> int:
        return sum(not op["ok"] for op in self.ops)

    async def fill(self) -> None:
        """Upload the first `window` churn adapters."""
        while len(self.live.churn) < self.window:
            await self._upload(replace=None)

    async def run(self, stop: asyncio.Event) -> None:
        tick = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
                return
            except TimeoutError:
                pass
            if tick % 3 == 2 and self.live.churn:
                await self._upload(replace=self.rng.choice(self.live.churn))
            else:
                await self._upload(replace=None)
                while len(self.live.churn) > self.window:
                    await self._delete(self.live.churn[0])
            tick += 1

    async def _upload(self, replace: str | None) -> None:
        index = int(replace.rsplit("-", 1)[1]) if replace else self.next_index
        name = f"churn-{index}"
        self.next_index += replace is None
        self.next_seed += 1
        started = time.perf_counter()
        report = await upload_adapters(
            self.url, [self.key], self.shapes, 1, self.rank, prefix="churn-",
            start=index, seed=self.next_seed, replace=replace is not None,
        )  # fmt: skip
        ok = report.uploaded == 1
        if ok and replace is None:
            self.live.churn.append(name)
        op = "replace" if replace else "upload"
        self._log(op, name, started, ok, "; ".join(report.messages)[:300])

    async def _delete(self, name: str) -> None:
        self.live.churn.remove(name)  # no new request names it
        started = time.perf_counter()
        while self.live.before_first_token[name] > 0:
            if time.perf_counter() - started > self.grace_s:
                break  # a request still waits; it may get 404, which counts as an error
            await asyncio.sleep(0.05)
        waited = time.perf_counter() - started
        streams = self.live.in_flight[name]  # still streaming from the adapter
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                response = await client.delete(
                    f"{self.url}/v1/adapters/{name}",
                    headers={"Authorization": f"Bearer {self.key}"},
                )
            ok, detail = response.status_code == 204, response.text[:300]
        except httpx.HTTPError as exc:
            ok, detail = False, repr(exc)
        self._log(
            "delete", name, started, ok, detail, waited_s=round(waited, 3),
            streaming=streams,
        )  # fmt: skip

    def _log(self, op, name, started, ok, detail, **extra) -> None:
        now = time.perf_counter()
        row = {"t": round(now - self.t0, 2), "op": op, "name": name, "ok": ok}
        row |= {"seconds": round(now - started, 3), **extra}
        if not ok:
            row["detail"] = detail
        self.ops.append(row)
