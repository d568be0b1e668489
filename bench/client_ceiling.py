"""``rayfleet bench client``: the load generator's own ceiling, against a server that does nothing.

Benchmarks here run the client on the same two cores as the servers, so a result is
only meaningful well below the rate at which the client itself saturates. This measures
that rate (and the client's CPU per request) against a raw-socket server in another
process that answers every request with the same precomputed bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import cast

import orjson
import uvloop

from bench import loadgen
from bench.stats import BenchReport, BenchRow, compute_metrics
from bench.tables import format_table
from bench.workloads import RequestSpec

_REPO_ROOT = str(Path(__file__).resolve().parents[1])


def http_response(body: bytes, content_type: str = "application/json", status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def completion_response(tokens: int) -> bytes:
    """A non-streamed ``/v1/completions`` answer of ``tokens`` tokens."""
    body = {
        "id": "cmpl-fixed",
        "object": "text_completion",
        "model": "fixed",
        "choices": [{"index": 0, "text": " x" * tokens, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    }
    return http_response(orjson.dumps(body))


def completion_stream_response(tokens: int) -> bytes:
    """A streamed ``/v1/completions`` answer: one chunk per token, usage, ``[DONE]``."""
    events = [
        orjson.dumps({"id": "cmpl-fixed", "choices": [{"index": 0, "text": " x", "finish_reason": None}]})
        for _ in range(tokens)
    ]
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
    events.append(orjson.dumps({"id": "cmpl-fixed", "choices": [], "usage": usage}))
    body = b"".join(b"data: " + event + b"\n\n" for event in events) + b"data: [DONE]\n\n"
    return http_response(body, "text/event-stream")


class _FixedAnswer(asyncio.Protocol):
    """HTTP/1.1 keep-alive with the least work possible: find each request's end, write the answer."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        while (head_end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:head_end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            end = head_end + 4 + length
            if len(buffer) < end:
                break
            buffer = buffer[end:]
            assert self._transport is not None
            self._transport.write(self._response)
        self._buffer = buffer


def serve_stdin() -> None:
    """Child-process entry: read the answer from stdin, print the bound port, serve until killed."""
    response = sys.stdin.buffer.read()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FixedAnswer(response), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


@contextmanager
def fixed_response_server(response: bytes) -> Iterator[str]:
    """A server process answering every request with ``response``; yields its base URL.

    A plain subprocess rather than ``multiprocessing``: spawning re-imports the caller's
    ``__main__``, which a CLI entry point or a test runner should not have to guard.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (_REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    command = [sys.executable, "-c", "from bench.client_ceiling import serve_stdin; serve_stdin()"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(response)
        process.stdin.close()
        port = process.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the fixed-response server exited with code {process.wait()}")
        yield f"http://127.0.0.1:{int(port)}"
    finally:
        process.terminate()
        process.wait()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("client", help="the load generator's own max requests/s, against a no-op server")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--tokens", type=int, default=16, help="output tokens (= SSE chunks) per answer")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.set_defaults(bench_run=run)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, concurrency: int, duration_s: float, stream: bool, tokens: int) -> BenchRow:
    """Closed loop against ``url`` for ``duration_s``; the row carries the client's CPU cost."""
    spec = RequestSpec(send_at=0.0, api="completions", prompt_len=8, max_tokens=tokens, prompt=" x" * 8)
    request = loadgen.prepare(spec, loadgen.Target(url, "fixed", stream=stream, timeout_s=30.0))
    cpu_before, wall_before = _cpu_seconds(), perf_counter()
    records = loadgen.run(loadgen.run_closed_loop(lambda _: request, concurrency, 30.0, duration_s=duration_s))
    cpu, wall = _cpu_seconds() - cpu_before, perf_counter() - wall_before
    workload = f"noop-sse-{tokens}tok" if stream else "noop-json"
    return BenchRow.from_metrics(
        compute_metrics(records),
        policy="loadgen",
        workload=workload,
        concurrency=concurrency,
        client_cpu_us_per_req=cpu / max(len(records), 1) * 1e6,
        client_cpu_util=cpu / wall,
    )


def run(args: argparse.Namespace) -> int:
    response = completion_stream_response(args.tokens) if args.stream else completion_response(args.tokens)
    with fixed_response_server(response) as url:
        row = measure(url, args.concurrency, args.duration, args.stream, args.tokens)
    print(format_table([row]))
    if args.out is not None:
        BenchReport(bench="client", rows=[row], meta={"duration_s": args.duration}).write(args.out)
    return 0
