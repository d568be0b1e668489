"""The async load generator: open loop (send on schedule) and closed loop (N workers).

It shares two CPU cores with the servers it measures, so the hot path is lean: request
bodies are serialized before the clock starts, one keep-alive ``aiohttp`` session with an
unlimited connector carries everything, and a streamed response is cut into SSE events
on raw bytes and only token/usage fields are read. ``httpx`` is not used on purpose: it
collapses under this kind of concurrency.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, TypeVar

import aiohttp
import orjson
import uvloop

from bench.stats import RequestRecord
from bench.workloads import RequestSpec
from serve_apps.routing.session_affinity import SESSION_HEADER

_ERROR_TEXT_LIMIT = 300
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: one OpenAI-compatible server (a gateway or an engine)."""

    base_url: str
    model: str
    stream: bool = True
    api_key: str | None = None
    timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready for the wire, built before the clock starts."""

    url: str
    body: bytes
    headers: dict[str, str]
    stream: bool


def prepare(spec: RequestSpec, target: Target) -> PreparedRequest:
    """vLLM's OpenAI API body for ``spec``; usage is always requested so output tokens are exact."""
    body: dict[str, Any] = {"model": target.model}
    if spec.api == "chat":
        body["messages"] = spec.messages
        body["max_completion_tokens"] = spec.max_tokens  # what vLLM's own benchmark sends
        path = "/v1/chat/completions"
    else:
        body["prompt"] = spec.prompt
        body["max_tokens"] = spec.max_tokens
        path = "/v1/completions"
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.user is not None:
        body["user"] = spec.user
    if spec.seed is not None:
        body["seed"] = spec.seed
    if target.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers = {"Content-Type": "application/json", **spec.headers}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    if spec.session is not None:
        headers[SESSION_HEADER] = spec.session
    return PreparedRequest(target.base_url.rstrip("/") + path, orjson.dumps(body), headers, target.stream)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a load-generation coroutine on uvloop, whose per-request overhead is the lowest."""
    return uvloop.run(coro)


def client_session(timeout_s: float) -> aiohttp.ClientSession:
    """One session for a whole run: no connection cap, keep-alive, a hard per-request deadline."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=None)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        skip_auto_headers=("User-Agent",),
        auto_decompress=False,
    )


def _apply_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.output_tokens = usage.get("completion_tokens") or 0
    record.prompt_tokens = usage.get("prompt_tokens")


def _error_message(error: object) -> str:
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or error)[:_ERROR_TEXT_LIMIT]


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, t0: float) -> None:
    """Timestamp every chunk that carries token text; keep the final usage; never build the text.

    A stream that stops before ``data: [DONE]`` is an error: the server died mid-answer.
    """
    times = record.token_times
    buffer = b""
    finished = False
    async for data in response.content.iter_any():
        now = perf_counter() - t0
        buffer += data
        if b"\n\n" not in buffer:
            continue
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data:"):
                continue  # SSE comments (keep-alive pings) and blank lines
            payload = event[5:].strip()
            if payload == b"[DONE]":
                finished = True
                continue
            chunk = orjson.loads(payload)
            choices = chunk.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta.get("content") if delta is not None else choice.get("text"):
                    times.append(now)
            usage = chunk.get("usage")
            if usage:
                _apply_usage(record, usage)
            if "error" in chunk:
                record.error = _error_message(chunk["error"])
    if record.error is not None:
        return
    if not finished:
        record.error = "stream ended before data: [DONE]"
    elif not times:
        record.error = "stream carried no token"
    else:
        record.end = times[-1]
        if not record.output_tokens:
            record.output_tokens = len(times)


async def _read_body(response: aiohttp.ClientResponse, record: RequestRecord, t0: float) -> None:
    body = orjson.loads(await response.read())
    record.end = perf_counter() - t0
    usage = body.get("usage")
    if usage:
        _apply_usage(record, usage)


async def send(session: aiohttp.ClientSession, request: PreparedRequest, record: RequestRecord, t0: float) -> None:
    """Send one request and fill ``record``; never raises for anything the server does.

    Status errors, connection errors, timeouts and malformed bodies all end up as
    ``record.error``: a misbehaving target must show up in the report, not end the run.
    """
    record.sent = perf_counter() - t0
    try:
        async with session.post(request.url, data=request.body, headers=request.headers) as response:
            record.status = response.status
            if response.status != 200:
                text = await response.text(errors="replace")
                record.error = (text or response.reason or "")[:_ERROR_TEXT_LIMIT]
            elif request.stream:
                await _read_stream(response, record, t0)
            else:
                await _read_body(response, record, t0)
    except TimeoutError:
        record.error = f"no complete answer within {session.timeout.total} s"
    except Exception as exc:  # noqa: BLE001 - see docstring: every failure is a data point
        record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
    if record.error is not None:
        record.end = perf_counter() - t0


async def run_open_loop(
    requests: Sequence[PreparedRequest], send_times: Sequence[float], timeout_s: float
) -> list[RequestRecord]:
    """Send request i at ``send_times[i]`` seconds after start, whatever the server is doing.

    The scheduler sleeps until each absolute send time and spawns a task, so a slow
    server never delays later sends (and a late wake-up never accumulates drift).
    """
    records: list[RequestRecord] = []
    async with client_session(timeout_s) as session:
        tasks: list[asyncio.Task[None]] = []
        t0 = perf_counter()
        for index, (request, at) in enumerate(zip(requests, send_times, strict=True)):
            delay = at - (perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(index=index, scheduled=at, sent=at)
            records.append(record)
            tasks.append(asyncio.create_task(send(session, request, record, t0)))
        await asyncio.gather(*tasks)
    return records


async def run_closed_loop(
    request_at: Callable[[int], PreparedRequest],
    concurrency: int,
    timeout_s: float,
    max_requests: int | None = None,
    duration_s: float | None = None,
) -> list[RequestRecord]:
    """``concurrency`` workers, each sending its next request as soon as the last one ends.

    Stops issuing after ``max_requests`` or ``duration_s`` (whichever comes first) and
    waits for what is in flight. ``request_at(i)`` may build request i lazily, which
    is what lets a duration-bound run go on without a precomputed list.
    """
    if max_requests is None and duration_s is None:
        raise ValueError("a closed loop needs max_requests or duration_s")
    records: list[RequestRecord] = []
    counter = itertools.count()

    async def worker(session: aiohttp.ClientSession, t0: float) -> None:
        while duration_s is None or perf_counter() - t0 < duration_s:
            index = next(counter)
            if max_requests is not None and index >= max_requests:
                return
            request = request_at(index)
            now = perf_counter() - t0
            record = RequestRecord(index=index, scheduled=now, sent=now)
            records.append(record)
            await send(session, request, record, t0)

    async with client_session(timeout_s) as session:
        t0 = perf_counter()
        await asyncio.gather(*(worker(session, t0) for _ in range(concurrency)))
    return records
