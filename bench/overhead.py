"""``rayfleet bench overhead``: what the gateway adds over going straight to an engine.

It starts the same stack ``rayfleet up`` runs, with one engine on the ``instant`` GPU
profile (answers as fast as the CPU allows), then sends identical closed-loop load first
directly to the engine and then through the gateway, at each concurrency in turn. Both
runs share the machine in the same minute, so the ratio is what to read: absolute
figures on a 2-core box include the load generator itself.

The default client is ``wrk`` (C, one thread) when it is installed: it leaves the cores to
the system under test, which is how the peer routers' figures were taken. ``--client
python`` uses rayfleet's own aiohttp load generator instead, which costs about 100 us of
CPU per request on the same two cores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import loadgen
from bench.errors import BenchUsageError
from bench.stats import BenchReport, BenchRow, Warmup, compute_metrics
from bench.tables import format_table
from bench.workloads import LengthPool, PromptBuilder, Workload
from engines.core.tokenizer import get_tokenizer

MODEL = "overhead-model"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "overhead",
        help="gateway vs direct on an instant engine: added latency at 1 client, throughput at 64",
        description=__doc__,
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], help="closed-loop clients per run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds excluded at the start of each run")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens (default %(default)s)")
    parser.add_argument("--output-len", type=int, default=1, help="output tokens (default %(default)s)")
    parser.add_argument("--stream", action="store_true", help="stream responses (default: non-streaming)")
    parser.add_argument(
        "--client", choices=["auto", "wrk", "python"], default="auto",
        help="load generator: wrk if installed (auto), or rayfleet's aiohttp client",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="gateway port for the self-hosted stack")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.set_defaults(bench_run=run)


def instant_workload(args: argparse.Namespace) -> Workload:
    return Workload(
        name="instant-engine",
        api="chat",
        lengths=LengthPool.fixed(args.input_len, args.output_len),
        prompts=PromptBuilder(get_tokenizer(), seed=0, salt=1),
    )


def instant_config() -> dict:
    """One engine on the ``instant`` profile: what is measured is the path, not the engine."""
    return {
        "models": [
            {
                "name": MODEL,
                "pool": {"replicas": 1, "engine_config": {"model": MODEL, "sim": {"gpu": "instant", "time_scale": 0.0}}},
            }
        ]
    }


def measure(
    url: str, workload: Workload, concurrency: int, args: argparse.Namespace, api_key: str | None = None
) -> BenchRow:
    """One closed-loop run at ``concurrency`` for ``args.duration`` seconds, with wrk or the python client."""
    target = loadgen.Target(base_url=url, model=MODEL, stream=args.stream, api_key=api_key, timeout_s=30.0)
    if args.client == "wrk":  # wrk replays one fixed body
        return _measure_wrk(loadgen.prepare(workload.spec(0), target), concurrency, args)
    prepared = [loadgen.prepare(workload.spec(i), target) for i in range(256)]
    records = loadgen.run(
        loadgen.run_closed_loop(lambda i: prepared[i % len(prepared)], concurrency, 30.0, duration_s=args.duration)
    )
    metrics = compute_metrics(records, warmup=Warmup(seconds=args.warmup))
    return BenchRow.from_metrics(metrics, policy="", workload="instant-engine", concurrency=concurrency)


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %f %f %f\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.bytes, latency:percentile(50) / 1e6, latency:percentile(99) / 1e6, latency.mean / 1e6))
end
"""
_WRK_RESULT = re.compile(r"RESULT (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)")


def _measure_wrk(request: loadgen.PreparedRequest, concurrency: int, args: argparse.Namespace) -> BenchRow:
    """One closed-loop run with wrk; its Lua ``done`` hook reports counts and latency percentiles."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in request.headers.items())
        script.write_text(_WRK_SCRIPT.format(body=json.dumps(request.body.decode()), headers=headers))
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{args.duration:g}s", "--timeout", "30s", "-s", str(script), request.url]
        output = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 60).stdout
    match = _WRK_RESULT.search(output)
    if match is None:
        raise RuntimeError(f"wrk gave no result: {output[-500:]}")
    requests, duration_us, errors = (int(match.group(i)) for i in (1, 2, 3))
    p50, p99, mean = (float(match.group(i)) for i in (5, 6, 7))
    rate = requests / (duration_us / 1e6)
    return BenchRow(
        policy="", workload="instant-engine", achieved_rps=rate, e2e_p50_s=p50, e2e_p99_s=p99, e2e_mean_s=mean,
        output_tok_s=rate * args.output_len, completed=requests - errors, errors=errors,
        concurrency=concurrency, duration_s=duration_us / 1e6,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from rayfleet.ports import port_in_use
    from rayfleet.stack import running_stack, wait_for_engines

    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") and not args.stream else "python"
    if args.client == "wrk" and (args.stream or not shutil.which("wrk")):
        raise BenchUsageError("--client wrk needs wrk installed (apt-get install wrk) and non-streaming load")
    if port_in_use("127.0.0.1", args.port):
        raise BenchUsageError(f"port {args.port} is in use: pass --port N (or stop `rayfleet up` first)")
    workload = instant_workload(args)
    config = instant_config()
    rows: list[BenchRow] = []
    with running_stack(config, "127.0.0.1", args.port, include_dashboard=False) as stack:
        (engine,) = [e for e in wait_for_engines(config, 120.0, threading.Event()) if e.model == MODEL]
        for concurrency in args.concurrency:
            for policy, url in (("direct", engine.url), ("gateway", stack.gateway_url)):
                row = measure(url, workload, concurrency, args)
                rows.append(row.model_copy(update={"policy": policy}))
                print(f"  c={concurrency:<3} {policy:<8} {row.achieved_rps:8.0f} req/s  E2E p50 "
                      f"{(row.e2e_p50_s or 0) * 1e3:.3f} ms", file=sys.stderr, flush=True)  # fmt: skip
    notes = _ratios(rows)
    print(format_table(rows))
    print("\n".join(notes))
    if args.out:
        BenchReport(bench="overhead", rows=rows, notes=notes, meta={"stream": args.stream, "client": args.client}).write(args.out)
    return 0


def _ratios(rows: list[BenchRow]) -> list[str]:
    """Per concurrency: the gateway's added E2E p50 and its share of direct throughput."""
    notes = []
    by_key = {(r.policy, r.concurrency): r for r in rows}
    for (policy, concurrency), gateway in by_key.items():
        direct = by_key.get(("direct", concurrency))
        if policy != "gateway" or direct is None or not direct.achieved_rps:
            continue
        added_ms = ((gateway.e2e_p50_s or 0) - (direct.e2e_p50_s or 0)) * 1e3
        notes.append(
            f"c={concurrency}: gateway adds {added_ms:.3f} ms E2E p50; "
            f"throughput {gateway.achieved_rps:.0f} vs {direct.achieved_rps:.0f} req/s direct "
            f"(ratio {gateway.achieved_rps / direct.achieved_rps:.2f})"
        )
    return notes
