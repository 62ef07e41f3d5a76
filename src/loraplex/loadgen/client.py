"""One streamed request against an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

from .workload import RequestSpec


@dataclass
class RequestRecord:
    """What happened to one request. Times in seconds; `status` 0 means no HTTP answer.

    `outcome` is "ok" (finished by `stop` or `length`), the status code of a refusal,
    `abort` (the server ended the stream early), `incomplete` (no `[DONE]`) or the name of a
    client-side error (`connect`, `timeout`, `read`, ...).
    """

    index: int
    tenant: int
    model: str
    kind: str
    start_s: float  # when it was sent, after the start of the run
    status: int = 0
    outcome: str = "incomplete"
    error: str = ""
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self, with_itl: bool) -> dict:
        row = asdict(self)
        row["tpot_s"] = self.tpot_s
        if not with_itl:
            row.pop("itl_s")
        return row


def request_body(spec: RequestSpec, endpoint: str, options: dict) -> dict:
    """The JSON body of `spec` for /v1/completions or /v1/chat/completions."""
    body = {
        "model": spec.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        **options,
    }
    if endpoint == "chat":
        body["messages"] = spec.messages
        body["max_completion_tokens"] = spec.max_tokens
    else:
        body["prompt"] = spec.prompt
        body["max_tokens"] = spec.max_tokens
    return body


async def send(
    client: httpx.AsyncClient,
    url: str,
    api_key: str,
    spec: RequestSpec,
    body: dict,
    started_at: float,
    on_first_token: Callable[[], None] | None = None,
) -> RequestRecord:
    """POST `body` and read its server-sent events to the end; never raises.

    :param on_first_token: called once, when the first token arrives (the server has
        admitted the call and holds its adapter), before the rest is read.
    """
    sent = time.perf_counter()
    record = RequestRecord(
        spec.index, spec.tenant, spec.model, spec.kind, sent - started_at
    )
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                record.outcome = str(response.status_code)
                record.error = _error_message(response)
                record.retry_after = response.headers.get("retry-after")
                return record
            await _read_events(response, record, sent, on_first_token)
    except httpx.TimeoutException as exc:
        record.outcome, record.error = "timeout", repr(exc)
    except httpx.ConnectError as exc:
        record.outcome, record.error = "connect", repr(exc)
    except httpx.HTTPError as exc:
        record.outcome, record.error = "read", repr(exc)
    except ValueError as exc:  # a chunk that is not JSON
        record.outcome, record.error = "bad_response", repr(exc)
    return record


async def _read_events(
    response: httpx.Response,
    record: RequestRecord,
    sent: float,
    on_first_token: Callable[[], None] | None = None,
) -> None:
    last_token: float | None = None
    finish = None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        now = time.perf_counter()
        if data == "[DONE]":
            record.e2el_s = now - sent
            if not record.output_tokens and record.ttft_s is not None:
                record.output_tokens = len(record.itl_s) + 1  # no usage chunk
            record.outcome = (
                "ok" if finish in ("stop", "length") else (finish or "abort")
            )
            return
        chunk = json.loads(data)
        if chunk.get("usage"):
            record.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            record.output_tokens = chunk["usage"].get("completion_tokens", 0)
        for choice in chunk.get("choices") or ():
            finish = choice.get("finish_reason") or finish
            if not _carries_tokens(choice):
                continue
            if last_token is None:
                record.ttft_s = now - sent
                if on_first_token is not None:
                    on_first_token()
            else:
                record.itl_s.append(now - last_token)
            last_token = now


def _carries_tokens(choice: dict) -> bool:
    """Whether a chunk reports generated tokens: every chunk does (its text may be empty,
    held back or an incomplete character) except chat's first, which only names the role."""
    delta = choice.get("delta")
    if delta is None:
        return True
    return not (delta.get("role") and not delta.get("content"))


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
