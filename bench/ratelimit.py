"""``rayfleet bench ratelimit``: what per-user limits cost the gateway.

Two measurements, side by side in one run:

- The limiter's own latency per request: admission (the only part on a request's path;
  the TPM charge happens after the last byte) measured from a process like a gateway
  replica, both the way the gateway does it (straight to the store) and through the
  ``UserService`` DeploymentHandle, the hop the gateway avoids.
- The gateway's throughput at 64 closed-loop clients on an ``instant`` engine, alternating
  runs without an identity (no limiter call) and with a user's API key (every request
  admitted and charged), so both see the same machine in the same minutes.

The store is Redis when ``--redis URL`` is given or ``redis-server`` is installed (a private
one is started), else the embedded SQLite store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from bench.errors import BenchUsageError
from bench.overhead import instant_config, instant_workload, measure
from bench.stats import BenchReport, BenchRow
from bench.tables import format_table

ADMIN_TOKEN = "bench-ratelimit-admin"
BENCH_USER = "bench-user"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ratelimit",
        help="the limiter's cost per request and the gateway's throughput with limits on and off",
        description=__doc__,
    )
    parser.add_argument("--redis", default=None, metavar="URL", help="an existing Redis (default: start one)")
    parser.add_argument("--store", choices=["auto", "redis", "embedded"], default="auto",
                        help="auto: Redis if redis-server is installed, else embedded")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds excluded at the start of each run")
    parser.add_argument("--repeat", type=int, default=2, help="off/on pairs of throughput runs (default %(default)s)")
    parser.add_argument("--samples", type=int, default=2000, help="admissions timed straight to the store")
    parser.add_argument("--handle-samples", type=int, default=300, help="admissions timed through the handle")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--port", type=int, default=8000, help="gateway port for the self-hosted stack")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.set_defaults(bench_run=run, input_len=32, output_len=1, stream=False)


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(store setting, description); a private redis-server lives as long as the context."""
    use_redis = args.redis is not None or args.store == "redis" or (
        args.store == "auto" and shutil.which("redis-server") is not None
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if not use_redis or args.store == "embedded":
            yield "embedded", f"embedded SQLite ({tmp})"
            return
        if args.redis:
            yield args.redis, args.redis
            return
        if shutil.which("redis-server") is None:
            raise BenchUsageError("--store redis needs redis-server (apt-get install redis-server) or --redis URL")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            yield f"redis://127.0.0.1:{port}/0", f"private redis-server on port {port}"
        finally:
            server.terminate()
            server.wait()


def _call(url: str, method: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode() if body is not None else None, method=method,
        headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_TOKEN}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # say what the gateway (or the ingress) answered
        raise RuntimeError(f"{method} {url}: HTTP {error.code}: {error.read()[:500]!r}") from None


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _time_limiter(users: dict, key: str, samples: int, handle_samples: int) -> list[BenchRow]:
    """Admission latency straight to the store (the gateway's path) and through the handle."""
    from ray import serve

    from rayfleet.stack import APP_NAME
    from serve_apps.config import UsersConfig
    from serve_apps.usage import Usage
    from serve_apps.users import open_store
    from serve_apps.users.limiter import Limiter
    from serve_apps.users.store import Identity, key_digest

    settings = UsersConfig.model_validate(users)
    limiter = Limiter(settings, open_store(settings))
    identity = limiter.identify({"authorization": f"Bearer {key}"})
    direct, settles = [], []
    for _ in range(samples):
        started = time.perf_counter()
        ticket = await limiter.admit(identity, 50)
        admitted = time.perf_counter()
        await limiter.settle(ticket, Usage(40, 1))
        direct.append(admitted - started)
        settles.append(time.perf_counter() - admitted)
    await limiter.store.close()
    handle = serve.get_deployment_handle("UserService", app_name=APP_NAME)
    hopped = []
    for _ in range(handle_samples):
        started = time.perf_counter()
        await handle.admit.remote(Identity("key", key_digest(key)), uuid.uuid4().hex, 50)
        hopped.append(time.perf_counter() - started)
    rows = []
    for path, timings in (("direct", direct), ("handle", hopped)):
        p50, p99 = _percentiles(timings)
        extra = {"settle_p50_s": _percentiles(settles)[0]} if path == "direct" else {}
        rows.append(BenchRow(policy=f"limiter:{path}", workload="admission", achieved_rps=1 / statistics.mean(timings),
                             output_tok_s=0.0, completed=len(timings), errors=0, limits="on", path=path,
                             limiter_p50_s=p50, limiter_p99_s=p99, **extra))  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    from rayfleet.ports import port_in_use
    from rayfleet.stack import running_stack, wait_for_engines

    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    if args.client == "wrk" and not shutil.which("wrk"):
        raise BenchUsageError("--client wrk needs wrk installed (apt-get install wrk)")
    if port_in_use("127.0.0.1", args.port):
        raise BenchUsageError(f"port {args.port} is in use: pass --port N (or stop `rayfleet up` first)")
    workload = instant_workload(args)
    rows: list[BenchRow] = []
    with _store(args) as (store, description):
        config = instant_config()
        embedded_path = str(Path(tempfile.gettempdir()) / f"rayfleet-bench-users-{uuid.uuid4().hex}.sqlite3")
        config["users"] = {"enabled": True, "store": store, "admin_token": ADMIN_TOKEN, "embedded_path": embedded_path}
        print(f"bench ratelimit: store {description}", file=sys.stderr, flush=True)
        with running_stack(config, "127.0.0.1", args.port, include_dashboard=False) as stack:
            wait_for_engines(config, 120.0, threading.Event())
            users_url = f"{stack.gateway_url}/v1/users"
            _call(users_url, "POST", {"name": BENCH_USER, "rpm": 1_000_000, "tpm": 10**12})
            key = _call(f"{users_url}/{BENCH_USER}/keys", "POST")["key"]
            limiter_rows = asyncio.run(_time_limiter(config["users"], key, args.samples, args.handle_samples))
            for row in limiter_rows:
                print(f"  limiter {row.path:<7} p50 {row.limiter_p50_s * 1e3:.3f} ms  p99 {row.limiter_p99_s * 1e3:.3f} ms",
                      file=sys.stderr, flush=True)  # fmt: skip
            for _ in range(args.repeat):
                for limits, api_key in (("off", None), ("on", key)):
                    row = measure(stack.gateway_url, workload, args.concurrency, args, api_key=api_key)
                    rows.append(row.model_copy(update={"policy": f"gateway limits={limits}", "limits": limits}))
                    print(f"  c={args.concurrency} limits {limits:<3} {row.achieved_rps:8.0f} req/s  E2E p50 "
                          f"{(row.e2e_p50_s or 0) * 1e3:.3f} ms  errors {row.errors}", file=sys.stderr, flush=True)  # fmt: skip
    rows = _with_limiter_figures(rows, limiter_rows) + limiter_rows
    notes = _notes(rows, description)
    print(format_table(rows))
    print("\n".join(notes))
    if args.out:
        BenchReport(bench="ratelimit", rows=rows, notes=notes, meta={"store": description, "client": args.client}).write(args.out)
    return 0


def _with_limiter_figures(rows: list[BenchRow], limiter_rows: list[BenchRow]) -> list[BenchRow]:
    """Throughput rows carry the limiter's direct p50/p99 (on) or zero (off), as the schema asks."""
    direct = next(r for r in limiter_rows if r.path == "direct")
    figures = {"on": (direct.limiter_p50_s, direct.limiter_p99_s), "off": (0.0, 0.0)}
    return [r.model_copy(update=dict(zip(("limiter_p50_s", "limiter_p99_s"), figures[r.limits]))) for r in rows]


def _notes(rows: list[BenchRow], description: str) -> list[str]:
    on = [r.achieved_rps for r in rows if getattr(r, "limits", None) == "on" and r.workload != "admission"]
    off = [r.achieved_rps for r in rows if getattr(r, "limits", None) == "off"]
    direct = next(r for r in rows if getattr(r, "path", None) == "direct")
    hopped = next(r for r in rows if getattr(r, "path", None) == "handle")
    return [
        f"store: {description}",
        f"limiter admission p50 {direct.limiter_p50_s * 1e3:.3f} ms, p99 {direct.limiter_p99_s * 1e3:.3f} ms straight "
        f"to the store; {hopped.limiter_p50_s * 1e3:.3f} / {hopped.limiter_p99_s * 1e3:.3f} ms through the "
        f"DeploymentHandle ({hopped.limiter_p50_s / direct.limiter_p50_s:.1f}x)",
        f"gateway throughput with limits on: {statistics.mean(on):.0f} vs {statistics.mean(off):.0f} req/s off "
        f"(ratio {statistics.mean(on) / statistics.mean(off):.2f})",
    ]
