"""``rayfleet bench routing``: routing policies side by side, ours and the peers', on
workloads where routing matters.

How a run goes:

1. Build the workloads (seeded token-id prompts, ``bench.routing_workloads``).
2. Find the rate at which ``random`` saturates this fleet, with the discrete-event
   simulation (``bench.fleet_sim``): the highest rate whose achieved rate stays within 5%
   of the offered one. Offered rates are then given as fractions of it (``--load``), so
   "70-90% of random's saturation" means the same thing on any GPU profile or fleet size.
3. Discrete-event sweep: every policy of ours x workload x load, in seconds of CPU each.
4. Live runs (``--live-load``): the same requests through rayfleet's gateway (policy by
   header) and through each peer router, all in front of the same simulator processes on a
   slowed clock, engine caches reset between runs. Peers only exist as binaries, so this
   is where they are compared.

Every row has the ``vllm bench serve`` latency set in engine seconds, goodput under the
stated SLO, the prefix-cache hit rate from the engines' own counters and the load
imbalance (max/mean requests per engine), both over the measured window only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from bench import loadgen, routing_workloads
from bench.errors import BenchUsageError
from bench.fleet_sim import EngineCounters, FleetResult, FleetSimulation, PrefixIndexMode
from bench.routing_workloads import RoutingWorkload
from bench.stats import BenchReport, BenchRow, RequestRecord, Slo, Warmup, compute_metrics, max_send_lag
from bench.tables import format_table
from engines.core.engine import EngineCoreConfig
from engines.core.profiles import get_gpu_profile
from serve_apps.routing import STRATEGY_CLASSES, build_strategy, options_model, strategy_names

MODEL = "routing-bench-model"
WORKLOADS = ("gsp-uniform", "gsp-zipf", "multi-turn", "azure-conv", "mooncake")
DEFAULT_POLICIES = ("random", "least-request", "power-of-two", "prefix-cache", "prefix-cache-and-load")
DEFAULT_PEERS = ("sglang-router:cache_aware", "vllm-router:cache_aware")
SATURATION_EFFICIENCY = 0.95  # achieved/offered below this is past saturation


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """How to build one workload; small enough to send to worker processes, which build
    (and cache) the workload themselves instead of unpickling megabytes of token ids."""

    name: str
    groups: int = 512
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    zipf_alpha: float = 1.1
    trace_path: str | None = None
    max_requests: int | None = None
    seed: int = 0


@lru_cache(maxsize=4)
def build_workload(spec: WorkloadSpec) -> RoutingWorkload:
    if spec.name in ("gsp-uniform", "gsp-zipf"):
        workload = routing_workloads.shared_prefix(
            spec.groups, spec.prompts_per_group, spec.system_prompt_len, spec.question_len, spec.output_len,
            "uniform" if spec.name == "gsp-uniform" else "zipf", spec.zipf_alpha, spec.seed,
        )  # fmt: skip
    elif spec.name == "multi-turn":
        workload = routing_workloads.multi_turn(seed=spec.seed)
    elif spec.name == "azure-conv":
        assert spec.trace_path is not None
        workload = routing_workloads.azure_conversation(spec.trace_path, seed=spec.seed)
    else:
        assert spec.trace_path is not None
        workload = routing_workloads.mooncake(spec.trace_path, seed=spec.seed)
    return workload.head(spec.max_requests) if spec.max_requests else workload


@dataclass(frozen=True, slots=True)
class FleetSpec:
    engines: int = 8
    gpu: str = "h100"

    def core_config(self) -> EngineCoreConfig:
        return EngineCoreConfig(gpu=self.gpu)


@dataclass(frozen=True, slots=True)
class Job:
    """One discrete-event run."""

    policy: str
    workload: WorkloadSpec
    rate: float
    load: float | None  # the rate as a fraction of random's saturation rate
    fleet: FleetSpec
    warmup_fraction: float
    seed: int
    prefix_index: PrefixIndexMode = "approximate"
    gateway_replicas: int = 1


def warmup_of(workload: RoutingWorkload, fraction: float) -> tuple[Warmup, float]:
    """The first ``fraction`` of requests are warm-up; the window opens at the next send."""
    count = min(int(len(workload.requests) * fraction), len(workload.requests) - 1)
    ordered = sorted(r.send_at for r in workload.requests)
    return Warmup(requests=count), ordered[count]


def simulate(job: Job) -> FleetResult:
    workload = build_workload(job.workload).at_rate(job.rate)
    simulation = FleetSimulation(
        job.fleet.engines, job.fleet.core_config(), lambda rng, clock: build_strategy(job.policy, rng, clock), job.seed,
        prefix_index=job.prefix_index, gateway_replicas=job.gateway_replicas,
    )  # fmt: skip
    return simulation.run(workload, warmup_of(workload, job.warmup_fraction)[1])


def uses_prefix_index(policy: str) -> bool:
    """Whether ``policy`` is one of ours that routes on a prefix index (events or approximate)."""
    return policy in STRATEGY_CLASSES and "hash_algo" in options_model(policy).model_fields


def index_modes_of(policy: str, modes: Sequence[PrefixIndexMode]) -> Sequence[PrefixIndexMode]:
    """The index modes to run ``policy`` under: each asked-for one if it uses an index, else one run."""
    return modes if uses_prefix_index(policy) else modes[:1]


def mode_label(policy: str, prefix_index: PrefixIndexMode) -> str | None:
    """The row's ``mode``: the prefix index for our prefix strategies, the peer for a peer."""
    if policy not in STRATEGY_CLASSES:
        return policy
    return prefix_index if uses_prefix_index(policy) else None


def routing_row(
    result: FleetResult, policy: str, workload: RoutingWorkload, rate: float, load: float | None,
    run: str, mode: str | None, slo: Slo, warmup_fraction: float,
) -> BenchRow:  # fmt: skip
    """A result row with the routing columns: hit rate and imbalance from engine counters,
    ``run`` (des or live) and ``mode`` (the prefix index, or the peer's name)."""
    warmup, _ = warmup_of(workload, warmup_fraction)
    metrics = compute_metrics(result.records, slo, warmup)
    return BenchRow.from_metrics(
        metrics, policy, workload.name, rate, None,
        run=run, mode=mode, load=load, hit_rate=hit_rate(result.engine_counters),
        imbalance=imbalance(result.engine_counters), preemptions=sum(c.preemptions for c in result.engine_counters),
    )  # fmt: skip


def hit_rate(counters: Sequence[EngineCounters]) -> float | None:
    """Prompt tokens served from the prefix cache / prompt tokens looked up, fleet-wide."""
    queries = sum(c.prefix_queries for c in counters)
    return sum(c.prefix_hits for c in counters) / queries if queries else None


def imbalance(counters: Sequence[EngineCounters]) -> float | None:
    """Max over mean requests per engine: 1.0 is perfectly even, N means one engine took all."""
    counts = [c.requests for c in counters]
    total = sum(counts)
    return max(counts) * len(counts) / total if total else None


def _job_row(job: Job, slo: Slo) -> BenchRow:
    result = simulate(job)
    workload = build_workload(job.workload).at_rate(job.rate)
    row = routing_row(
        result, job.policy, workload, job.rate, job.load, "des", mode_label(job.policy, job.prefix_index), slo,
        job.warmup_fraction,
    )  # fmt: skip
    return row.model_copy(update={"gateway_replicas": job.gateway_replicas})


def keeps_up(records: Sequence[RequestRecord], warmup: Warmup) -> bool:
    """Whether the fleet served the measured window as fast as requests arrived.

    Over the window from its start to the last send, completions equal arrivals minus the
    growth of the backlog (requests in flight). A fleet that keeps up has a steady backlog,
    so completions match arrivals; past saturation the backlog grows by (arrival rate -
    service rate) x time. So: completions in the window must reach 95% of its arrivals,
    which is service rate >= 95% of arrival rate, whatever the run's length or the
    requests' own latency.
    """
    start, measured = warmup.split(list(records))
    if not measured:
        return False
    last_send = max(r.scheduled for r in measured)
    completed = sum(1 for r in records if r.ok and start <= r.end <= last_send)
    return completed >= SATURATION_EFFICIENCY * len(measured)


def find_saturation(
    workload: WorkloadSpec, fleet: FleetSpec, seed: int, log: Callable[[str], None], precision: float = 1.03
) -> float:
    """The highest rate (req/s) at which ``random`` keeps up (``keeps_up``).

    A geometric ladder from 8 req/s per engine brackets the knee, then bisection narrows it
    until high/low <= ``precision``. Probes use the first 4,000 requests: shorter runs end
    while the backlog is still settling and read as saturated too early.
    """
    probe = replace(workload, max_requests=min(workload.max_requests or 4000, 4000))

    def probe_keeps_up(rate: float) -> bool:
        job = Job("random", probe, rate, None, fleet, 0.2, seed)
        warmup, _ = warmup_of(build_workload(probe), job.warmup_fraction)
        verdict = keeps_up(simulate(job).records, warmup)
        log(f"  saturation probe {rate:7.2f} req/s: {'keeps up' if verdict else 'falls behind'}")
        return verdict

    low = high = 8.0 * fleet.engines
    if probe_keeps_up(low):
        while probe_keeps_up(high := low * 1.5):
            low = high
    else:
        while not probe_keeps_up(low := high / 1.5):
            high = low
    while high / low > precision:
        middle = (low * high) ** 0.5
        low, high = (middle, high) if probe_keeps_up(middle) else (low, middle)
    return low


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> list[float]:
    try:
        values = [float(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "routing",
        help="routing policies (ours and sglang-router/vllm-router) on shared-prefix, multi-turn and trace workloads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workloads", default="gsp-uniform", help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--azure-trace", default=None, help="azure_conv_2023.csv (for azure-conv)")
    parser.add_argument("--mooncake-trace", default=None, help="mooncake_conversation.jsonl (for mooncake)")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="rayfleet strategies, or 'all'")
    parser.add_argument("--live-policies", default=None, help="rayfleet strategies for live runs (default: --policies)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="'sglang-router:POLICY,vllm-router:POLICY' or 'none'")
    parser.add_argument("--mode", choices=("des", "live", "both"), default="both")
    parser.add_argument("--prefix-index", default="approximate",
                        help="prefix strategies' index: approximate, events, or both ('approximate,events')")  # fmt: skip
    parser.add_argument("--gateway-replicas", type=int, default=1,
                        help="gateway replicas, each with its own view and approximate index (load balanced in turn)")  # fmt: skip
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--gpu", default="h100", help="engine profile: a100, h100, h200, l40s")
    parser.add_argument("--groups", type=int, default=512, help="shared-prefix groups (size them against KV capacity)")
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--system-prompt-len", type=int, default=2048)
    parser.add_argument("--question-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--zipf-alpha", type=float, default=1.1)
    parser.add_argument("--load", type=_fractions, default=[0.5, 0.7, 0.8, 0.9, 1.1],
                        help="offered rates as fractions of random's saturation rate")  # fmt: skip
    parser.add_argument("--rates", type=_fractions, default=None, help="offered rates in req/s (instead of --load)")
    parser.add_argument("--saturation", type=float, default=None,
                        help="random's saturation rate (req/s) from an earlier run: skips the search")  # fmt: skip
    parser.add_argument("--live-load", type=_fractions, default=[0.8], help="fractions of saturation for live runs")
    parser.add_argument("--live-requests", type=int, default=4000, help="requests per live run (the workload's first N)")
    parser.add_argument("--time-scale", type=float, default=5.0, help="wall seconds per engine second in live runs")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of each run's requests left out of the stats")
    parser.add_argument("--slo-ttft", type=float, default=0.5, help="goodput SLO, seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.05, help="goodput SLO, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for the simulated runs")
    parser.add_argument("--port", type=int, default=8000, help="gateway port for live runs")
    parser.add_argument("--quick", action="store_true",
                        help="under 3 minutes: shared-prefix workload only, the first 4,000 requests simulated with random / least-request / "
                             "prefix-cache-and-load at 70%% and 90%%, and a short live smoke of prefix-cache-and-load "
                             "and sglang-router:cache_aware")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--plot", default=None, help="write a PNG of TTFT p90 and goodput against offered rate")
    parser.set_defaults(bench_run=run)


@dataclass(slots=True)
class Plan:
    workloads: list[WorkloadSpec]
    policies: list[str]
    live_policies: list[str]
    peers: list[str]
    index_modes: list[PrefixIndexMode]
    fleet: FleetSpec
    slo: Slo
    notes: list[str] = field(default_factory=list)


def _trace_path(args: argparse.Namespace, name: str) -> str | None:
    if name not in ("azure-conv", "mooncake"):
        return None
    flag, path = ("--azure-trace", args.azure_trace) if name == "azure-conv" else ("--mooncake-trace", args.mooncake_trace)
    if path is None:
        raise BenchUsageError(f"workload {name} needs {flag} PATH (the traces are in ../shared/data/traces/)")
    if not Path(path).is_file():
        raise BenchUsageError(f"{flag} {path}: no such file")
    return path


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.quick:
        args.workloads, args.load, args.live_load, args.live_requests = "gsp-uniform", [0.7, 0.9], [0.8], 400
        args.policies = "random,least-request,prefix-cache-and-load"
        args.live_policies = "prefix-cache-and-load"
        args.peers = "sglang-router:cache_aware"
    names = _split(args.workloads)
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise BenchUsageError(f"unknown workload(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(WORKLOADS)}")
    policies = _policies(args.policies)
    live_policies = policies if args.live_policies is None else _policies(args.live_policies)
    peers = [] if args.peers == "none" else _split(args.peers)
    from bench.peers import PeerSpec

    for label in peers:
        try:
            PeerSpec.parse(label)
        except ValueError as exc:
            raise BenchUsageError(str(exc))
    index_modes = _split(args.prefix_index)
    bad_modes = [m for m in index_modes if m not in ("approximate", "events")]
    if bad_modes or not index_modes:
        raise BenchUsageError(f"--prefix-index takes approximate and/or events, got {args.prefix_index!r}")
    if args.engines < 1 or args.gateway_replicas < 1:
        raise BenchUsageError(f"--engines and --gateway-replicas must be >= 1, got {args.engines}, {args.gateway_replicas}")
    if not 0 <= args.warmup < 1:
        raise BenchUsageError(f"--warmup is a fraction in [0, 1), got {args.warmup}")
    if args.saturation is not None and args.saturation <= 0:
        raise BenchUsageError(f"--saturation is a rate in req/s, got {args.saturation}")
    if args.live_requests < 1 or args.time_scale <= 0:
        raise BenchUsageError("--live-requests must be >= 1 and --time-scale > 0")
    try:
        get_gpu_profile(args.gpu)
    except ValueError as exc:
        raise BenchUsageError(f"--gpu {args.gpu}: {exc}")
    workloads = [
        WorkloadSpec(
            name, args.groups, args.prompts_per_group, args.system_prompt_len, args.question_len, args.output_len,
            args.zipf_alpha, _trace_path(args, name), 4000 if args.quick else None, args.seed,
        )  # fmt: skip
        for name in names
    ]
    fleet = FleetSpec(args.engines, args.gpu)
    return Plan(workloads, policies, live_policies, peers, index_modes, fleet, Slo(args.slo_ttft, args.slo_tpot))


def _policies(text: str) -> list[str]:
    policies = strategy_names() if text == "all" else _split(text)
    bad = [p for p in policies if p not in STRATEGY_CLASSES]
    if bad or not policies:
        raise BenchUsageError(f"unknown policy {', '.join(bad) or '(none)'}; valid: {', '.join(strategy_names())} or 'all'")
    return policies


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rates(args: argparse.Namespace, saturation: float | None, loads: list[float]) -> list[tuple[float, float | None]]:
    if args.rates is not None:
        return [(rate, rate / saturation if saturation else None) for rate in args.rates]
    assert saturation is not None
    return [(load * saturation, load) for load in loads]


def run_des(plan: Plan, args: argparse.Namespace, saturations: dict[str, float]) -> list[BenchRow]:
    jobs = [
        Job(policy, workload, rate, load, plan.fleet, args.warmup, args.seed, index, args.gateway_replicas)
        for workload in plan.workloads
        for rate, load in _rates(args, saturations.get(workload.name), args.load)
        for policy in plan.policies
        for index in index_modes_of(policy, plan.index_modes)
    ]
    _log(f"bench routing: {len(jobs)} simulated runs on {args.jobs} process(es)")
    if args.jobs <= 1:
        return [_job_row(job, plan.slo) for job in jobs]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(_job_row, jobs, [plan.slo] * len(jobs)))


def _live_config(plan: Plan, args: argparse.Namespace, prefix_index: PrefixIndexMode) -> dict:
    return {
        "gateway": {"default_strategy": "random", "seed": args.seed, "num_replicas": args.gateway_replicas},
        "models": [{
            "name": MODEL,
            "prefix_index": prefix_index,
            "pool": {"replicas": plan.fleet.engines, "engine_config": {
                "model": MODEL, "sim": {"gpu": plan.fleet.gpu, "time_scale": args.time_scale, "seed": args.seed},
            }},
        }],
    }  # fmt: skip


def run_live_sweep(plan: Plan, args: argparse.Namespace, saturations: dict[str, float]) -> list[BenchRow]:
    """One stack per prefix-index mode (the mode is per model, fixed at deployment): the
    first serves every live policy and the peers, later ones only the prefix strategies."""
    from rayfleet.ports import port_in_use

    if port_in_use("127.0.0.1", args.port):
        raise BenchUsageError(f"port {args.port} is in use: pass --port N (or stop `rayfleet up` first)")
    rows: list[BenchRow] = []
    for position, prefix_index in enumerate(plan.index_modes):
        policies = [p for p in plan.live_policies if position == 0 or uses_prefix_index(p)]
        peers = plan.peers if position == 0 else []
        if policies or peers:
            rows += _live_stack(plan, args, saturations, prefix_index, policies, peers)
    return rows


def _live_stack(
    plan: Plan, args: argparse.Namespace, saturations: dict[str, float], prefix_index: PrefixIndexMode,
    policies: list[str], peers: list[str],
) -> list[BenchRow]:  # fmt: skip
    from bench.peers import PeerSpec, running_peer
    from bench.routing_live import LiveRun, reset_prefix_caches, run_live
    from rayfleet.stack import running_stack, wait_for_engines

    config = _live_config(plan, args, prefix_index)
    rows: list[BenchRow] = []
    salt = int(time.time())
    with running_stack(config, "127.0.0.1", args.port, include_dashboard=False) as stack:
        engines = [e for e in wait_for_engines(config, 180.0, threading.Event()) if e.model == MODEL and e.ready]
        urls = tuple(sorted(e.url for e in engines))
        if len(urls) < plan.fleet.engines:
            raise RuntimeError(f"only {len(urls)} of {plan.fleet.engines} engines started; logs in /tmp/rayfleet/logs")
        for spec in plan.workloads:
            base = build_workload(spec).head(args.live_requests)
            for rate, load in _rates(args, saturations.get(spec.name), args.live_load):
                workload = base.at_rate(rate)
                measure_from = warmup_of(workload, args.warmup)[1]
                targets: list[tuple[str, Callable[[], object]]] = []
                for policy in policies:
                    targets.append((policy, lambda: nullcontext(stack.gateway_url)))
                for label in peers:
                    targets.append((label, lambda label=label: running_peer(PeerSpec.parse(label), list(urls))))
                for policy, open_target in targets:
                    salt += 1
                    asyncio.run(reset_prefix_caches(urls))
                    with open_target() as base_url:  # type: ignore[attr-defined]
                        headers = (("routing-strategy", policy),) if policy in STRATEGY_CLASSES else ()
                        run = LiveRun(loadgen.Target(base_url, MODEL), urls, args.time_scale, salt, headers)
                        _log(f"bench routing: live {policy} ({mode_label(policy, prefix_index) or '-'}) on {spec.name} "
                             f"at {rate:.1f} req/s ({len(workload.requests)} requests, "
                             f"~{workload.requests[-1].send_at * args.time_scale:.0f} s)")  # fmt: skip
                        result = loadgen.run(run_live(run, workload, measure_from))
                    row = routing_row(
                        result, policy, workload, rate, load, "live", mode_label(policy, prefix_index), plan.slo,
                        args.warmup,
                    )  # fmt: skip
                    row = row.model_copy(
                        update={"gateway_replicas": args.gateway_replicas, "max_send_lag_s": max_send_lag(result.records)}
                    )
                    _log(f"  TTFT p90 {row.ttft_p90_s or 0:.3f} s, hit rate {row.hit_rate or 0:.2f}, errors {row.errors}")
                    rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    started = time.monotonic()
    saturations: dict[str, float] = {}
    if args.saturation is not None:
        saturations = {workload.name: args.saturation for workload in plan.workloads}
    elif args.rates is None:
        for workload in plan.workloads:
            _log(f"bench routing: finding random's saturation rate on {workload.name} ({plan.fleet.engines} x {plan.fleet.gpu})")
            saturations[workload.name] = find_saturation(
                workload, plan.fleet, args.seed, _log, 1.06 if args.quick else 1.03
            )
            _log(f"  random saturates at about {saturations[workload.name]:.1f} req/s")
    rows: list[BenchRow] = []
    if args.mode in ("des", "both"):
        rows += run_des(plan, args, saturations)
    if args.mode in ("live", "both"):
        rows += run_live_sweep(plan, args, saturations)
    notes = [
        f"{workload.name}: {build_workload(workload).description}" for workload in plan.workloads
    ] + [f"{name}: random saturates at {rate:.1f} req/s (simulated)" for name, rate in saturations.items()]
    notes += [
        f"fleet: {plan.fleet.engines} simulated {plan.fleet.gpu} engines (Llama-3.1-8B profile); latencies in engine "
        f"seconds; live runs on a clock slowed {args.time_scale:g}x; warm-up: first {args.warmup:.0%} of requests",
        f"goodput SLO: TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tpot:g} s",
        *(["--quick: the live rows are a smoke run of a few hundred requests, mostly first visits to their "
           "system prompt; read steady-state hit rates and latency from the simulated rows or a full run"]
          if args.quick and args.mode != "des" else []),
        f"took {time.monotonic() - started:.0f} s",
    ]
    print(format_table(rows))
    print("\n".join(notes))
    if args.out:
        meta = {"seed": args.seed, "saturation_rps": saturations, "time_scale": args.time_scale, "warmup": args.warmup}
        BenchReport(bench="routing", rows=rows, notes=notes, meta=meta).write(args.out)
    if args.plot:
        from bench.plots import plot_routing

        plot_routing(rows, args.plot)
    return 0
