"""``rayfleet bench serve``: ``vllm bench serve`` against a gateway or an engine.

One invocation builds a seeded request list, plays it open loop (``--rate`` or a trace's
own times) or closed loop (``--concurrency``), and prints vLLM's metric set. With
``--direct URL`` the same lengths and send times are replayed against the engine itself,
so the gateway's cost reads straight off the two rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench import loadgen
from bench.errors import BenchUsageError
from bench.stats import (
    BenchReport,
    BenchRow,
    RequestRecord,
    Slo,
    Warmup,
    compute_metrics,
    error_samples,
    max_send_lag,
)
from bench.tables import format_summary, format_table
from bench.workloads import (
    WORD_VOCAB,
    LengthPool,
    PromptBuilder,
    Workload,
    count_for_duration,
    gamma_arrivals,
    load_azure_trace,
    load_length_pairs,
    offered_rate,
)
from engines.core.tokenizer import get_tokenizer

DEFAULT_NUM_REQUESTS = 1000
_LAG_WARNING_S = 0.05  # a scheduler this late means the client, not the server, shaped the load
_TRACE_COLUMNS = "arrived_at,num_prefill_tokens,num_decode_tokens"
_DATASET_COLUMNS = "num_prefill_tokens,num_decode_tokens"


@dataclass(frozen=True, slots=True)
class ServePlan:
    """A validated command line: what to send, and whether on a schedule or by N workers."""

    workload: Workload
    send_times: list[float] | None  # open loop when set
    concurrency: int | None  # closed loop when set
    max_requests: int | None
    duration_s: float | None
    offered_rps: float | None
    warmup: Warmup
    slo: Slo


def _parse_warmup(text: str) -> Warmup:
    """``20`` skips the first 20 requests; ``5s`` skips those scheduled in the first 5 s."""
    try:
        if text.endswith("s"):
            return Warmup(seconds=float(text[:-1]))
        return Warmup(requests=int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--warmup takes a request count (20) or seconds (5s), got {text!r}")


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--header takes 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="open/closed-loop load against an OpenAI-compatible URL, vLLM's metric set",
        description=__doc__,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway or engine base URL")
    parser.add_argument("--model", required=True, help="model name sent in every request")
    parser.add_argument("--api", choices=("chat", "completions"), default="completions")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: mean requests/s")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    parser.add_argument("--burstiness", type=float, default=None, help="gamma shape of gaps (1 = Poisson)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds of sending")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dataset", choices=("sharegpt",), default=None, help="length pairs from a CSV")
    parser.add_argument("--dataset-path", default=None)
    parser.add_argument("--trace", choices=("azure",), default=None, help="replay a trace's times and lengths")
    parser.add_argument("--trace-path", default=None)
    parser.add_argument("--trace-time-scale", type=float, default=1.0, help="0.1 replays 10x faster")
    parser.add_argument("--trace-start", type=float, default=0.0, help="trace second that becomes time 0")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-salt",
        type=int,
        default=None,
        help="first token of every prompt; random by default so no run reuses another's cached prefixes",
    )
    parser.add_argument("--warmup", type=_parse_warmup, default=Warmup(), help="N requests or Ns seconds")
    parser.add_argument("--slo-ttft", type=float, default=None, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=None, help="seconds")
    parser.add_argument("--slo-e2e", type=float, default=None, help="seconds")
    parser.add_argument("--direct", default=None, help="engine URL to replay the same requests against")
    parser.add_argument("--policy", default="default", help="row label for the main run")
    parser.add_argument("--workload", default=None, help="row label for the workload")
    parser.add_argument("--header", type=_parse_header, action="append", default=[], help="'Name: value'")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.set_defaults(bench_run=run)


def _existing(path: str | None, what: str, flag: str, columns: str) -> Path:
    if path is None:
        raise BenchUsageError(f"no {what} file given: pass {flag} to a CSV with {columns}")
    if not Path(path).is_file():
        raise BenchUsageError(f"{what} file {path} not found: pass {flag} to a CSV with {columns}")
    return Path(path)


def _check_args(args: argparse.Namespace) -> None:
    if not args.url.startswith(("http://", "https://")):
        raise BenchUsageError(f"--url {args.url!r} is not a URL: pass e.g. --url http://127.0.0.1:8000")
    if args.direct is not None and not args.direct.startswith(("http://", "https://")):
        raise BenchUsageError(f"--direct {args.direct!r} is not a URL: pass the engine's, e.g. http://127.0.0.1:8100")
    if args.rate is None and args.concurrency is None and args.trace is None:
        raise BenchUsageError("no load given: pass --rate R (open loop), --concurrency C (closed) or --trace azure")
    if args.rate is not None and not 0 < args.rate < float("inf"):
        raise BenchUsageError(f"--rate must be a positive number, got {args.rate}: use --concurrency to saturate")
    if args.concurrency is not None and args.concurrency < 1:
        raise BenchUsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.burstiness is not None and (args.rate is None or args.burstiness <= 0):
        raise BenchUsageError("--burstiness shapes --rate arrivals: pass it with --rate, as a number > 0")
    if args.rate is not None and args.num_requests is not None and args.duration is not None:
        raise BenchUsageError("with --rate pass --num-requests or --duration, not both")
    if args.num_requests is not None and args.num_requests < 1:
        raise BenchUsageError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.duration is not None and args.duration <= 0:
        raise BenchUsageError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.trace is not None and args.dataset is not None:
        raise BenchUsageError("--trace and --dataset both give lengths: pass one of them")
    if args.trace_time_scale <= 0:
        raise BenchUsageError(f"--trace-time-scale must be > 0, got {args.trace_time_scale} (0.1 replays 10x faster)")
    if not args.stream and (args.slo_ttft is not None or args.slo_tpot is not None):
        raise BenchUsageError("TTFT/TPOT SLOs need streamed responses: drop --no-stream or use --slo-e2e only")


def _lengths_and_trace_times(args: argparse.Namespace, replay: bool) -> tuple[LengthPool, list[float] | None, str]:
    """The length source, the trace's send times when it is replayed, and a workload label."""
    try:
        if args.trace is not None:
            path = _existing(args.trace_path, "trace", "--trace-path", _TRACE_COLUMNS)
            traced = load_azure_trace(
                path,
                time_scale=args.trace_time_scale,
                start_s=args.trace_start,
                max_requests=args.num_requests if replay else None,
                duration_s=args.duration if replay else None,
            )
            if not traced:
                raise BenchUsageError(f"{path} has no request in the chosen window: check --trace-start/--duration")
            pool = LengthPool(tuple(t.lengths for t in traced))
            return pool, [t.send_at for t in traced] if replay else None, path.stem
        if args.dataset is not None:
            path = _existing(args.dataset_path, "dataset", "--dataset-path", _DATASET_COLUMNS)
            pairs = load_length_pairs(path)
            if not pairs:
                raise BenchUsageError(f"{path} has no usable row: it needs {_DATASET_COLUMNS} >= 1")
            return LengthPool.shuffled(pairs, args.seed), None, args.dataset
        return LengthPool.fixed(args.input_len, args.output_len), None, f"fixed-in{args.input_len}-out{args.output_len}"
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from exc


def plan_from_args(args: argparse.Namespace, prompt_salt: int) -> ServePlan:
    """Validate the command line and turn it into a plan; every mistake is a ``BenchUsageError``."""
    _check_args(args)
    replay = args.trace is not None and args.rate is None and args.concurrency is None
    lengths, send_times, label = _lengths_and_trace_times(args, replay)
    workload = Workload(
        name=args.workload or label,
        api=args.api,
        lengths=lengths,
        prompts=PromptBuilder(get_tokenizer(), seed=args.seed, salt=prompt_salt),
        headers=dict(args.header),
    )
    max_requests, duration_s = args.num_requests, args.duration
    if args.rate is not None:
        count = count_for_duration(args.rate, duration_s) if duration_s else max_requests or DEFAULT_NUM_REQUESTS
        send_times = gamma_arrivals(args.rate, count, args.burstiness or 1.0, args.seed)
    elif args.concurrency is not None and max_requests is None and duration_s is None:
        max_requests = DEFAULT_NUM_REQUESTS
    return ServePlan(
        workload=workload,
        send_times=send_times,
        concurrency=args.concurrency,
        max_requests=max_requests,
        duration_s=duration_s,
        offered_rps=offered_rate(send_times) if send_times is not None else None,
        warmup=args.warmup,
        slo=Slo(args.slo_ttft, args.slo_tpot, args.slo_e2e),
    )


async def execute(plan: ServePlan, workload: Workload, target: loadgen.Target) -> list[RequestRecord]:
    """One run of ``plan``; request bodies are built before the load generator's clock starts."""
    if plan.send_times is not None:
        prepared = [loadgen.prepare(spec, target) for spec in workload.specs(plan.send_times)]
        return await loadgen.run_open_loop(prepared, plan.send_times, target.timeout_s)
    assert plan.concurrency is not None
    if plan.duration_s is None:
        assert plan.max_requests is not None
        request_at = [loadgen.prepare(workload.spec(i), target) for i in range(plan.max_requests)].__getitem__
    else:

        def request_at(index: int) -> loadgen.PreparedRequest:
            return loadgen.prepare(workload.spec(index), target)

    return await loadgen.run_closed_loop(
        request_at, plan.concurrency, target.timeout_s, plan.max_requests, plan.duration_s
    )


def overhead_line(gateway: BenchRow, direct: BenchRow) -> str:
    """What the gateway costs, from two rows of the same requests."""

    def delta_ms(ours: float | None, theirs: float | None) -> str:
        return "n/a" if ours is None or theirs is None else f"{(ours - theirs) * 1000:+.1f} ms"

    ratio = f"{gateway.achieved_rps / direct.achieved_rps:.3f}" if direct.achieved_rps else "n/a"
    return (
        f"gateway added latency: TTFT p50 {delta_ms(gateway.ttft_p50_s, direct.ttft_p50_s)}, "
        f"E2E p50 {delta_ms(gateway.e2e_p50_s, direct.e2e_p50_s)}; throughput ratio {ratio}"
    )


def run(args: argparse.Namespace) -> int:
    salt = args.prompt_salt if args.prompt_salt is not None else int.from_bytes(os.urandom(4), "big") % WORD_VOCAB
    plan = plan_from_args(args, salt)
    target = loadgen.Target(args.url, args.model, args.stream, args.api_key, args.request_timeout)
    runs = [(args.policy, target, plan.workload)]
    if args.direct is not None:
        # Same lengths and send times, another salt: the engine must not serve the
        # second run from the prefixes the first one left in its cache.
        runs.append(("direct", replace(target, base_url=args.direct), plan.workload.salted(salt + 1)))

    rows: list[BenchRow] = []
    notes: list[str] = []
    runs_meta: list[dict[str, object]] = []
    for policy, run_target, workload in runs:
        print(f"bench serve: {policy} -> {run_target.base_url}", file=sys.stderr, flush=True)
        records = loadgen.run(execute(plan, workload, run_target))
        metrics = compute_metrics(records, plan.slo, plan.warmup)
        rows.append(BenchRow.from_metrics(metrics, policy, workload.name, plan.offered_rps, plan.concurrency))
        lag = max_send_lag(records)
        samples = error_samples(records)
        runs_meta.append({"policy": policy, "url": run_target.base_url, "sent": len(records), "max_send_lag_s": lag})
        print(format_summary(f"{policy}: {workload.name}", metrics))
        notes += [f"{policy} error: {sample}" for sample in samples]
        if plan.send_times is not None and lag > _LAG_WARNING_S:
            notes.append(f"{policy}: the load generator fell up to {lag * 1000:.0f} ms behind its schedule")
    if len(rows) == 2:
        notes.append(overhead_line(rows[0], rows[1]))

    print(format_table(rows))
    for note in notes:
        print(note)
    if args.out is not None:
        meta = {
            "model": args.model,
            "api": args.api,
            "stream": args.stream,
            "seed": args.seed,
            "prompt_salt": salt,
            "rate": args.rate,
            "burstiness": args.burstiness,
            "warmup": {"requests": plan.warmup.requests, "seconds": plan.warmup.seconds},
            "slo_s": {"ttft": args.slo_ttft, "tpot": args.slo_tpot, "e2e": args.slo_e2e},
            "runs": runs_meta,
        }
        BenchReport(bench="serve", rows=rows, notes=notes, meta=meta).write(args.out)
    if all(row.completed == 0 for row in rows):
        print("bench serve: no request completed; see the errors above", file=sys.stderr)
        return 1
    return 0
