"""``rayfleet bench autoscale``: HPA, KPA and APA against fleets fixed at their minimum and
maximum, on the Azure traces and on synthetic load patterns, in a discrete-event simulation.

How a run goes:

1. Build the workloads (``bench.autoscale_workloads``): the Azure code and conversation
   traces on their own time axis with their load scaled (``--code-scale``, ``--conv-scale``),
   and the four synthetic patterns with ShareGPT lengths, peaking at ``--peak-rate``.
2. Set the concurrency target per request mix (``bench.autoscale_sim.calibrate``): the
   concurrency one replica holds at 70% of the rate it can carry within the SLO; ``--target``
   sets one for all instead.
3. Per workload, run the fleet fixed at ``--max-replicas`` first: it is the reference for
   what the load needs (its concurrency over the target), which gives the count the
   autoscaled fleets start at (the first minute's need) and the count a burst needs.
4. Run every policy on the same requests (``bench.autoscale_sim.AutoscaleSimulation``),
   H100 engines running Llama-3.1-8B, time as fast as the CPU allows.

Columns: ``slo_attainment`` (share of requests with TTFT <= ``--slo-ttft`` and TPOT <=
``--slo-tpot``; ``ttft_attainment`` and ``tpot_attainment`` each alone), ``replica_seconds``
(the cost: from each scale-up decision to the end of the replica's drain), ``scale_events``
(changes of the desired count), ``oscillations`` (a change reversing the previous one within
``--oscillation-window``) and ``reaction_s`` (from the start of the workload's largest rise
in offered load until the ready replicas reach what its peak needs), next to the usual
latency columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from autoscaling import ScalingPolicy, build_policy
from autoscaling.spec import (
    ANNOTATION_PREFIX,
    ApaSettings,
    HpaSettings,
    KpaSettings,
    ScalingStrategy,
    settings_from_annotations,
)
from bench.autoscale_sim import (
    SAMPLE_INTERVAL_S,
    TARGET_UTILISATION,
    AutoscaleSimulation,
    Calibration,
    FleetBounds,
    RunResult,
    Timeline,
    autoscaler_spec,
    calibrate,
    count_oscillations,
    reaction_time,
    replicas_needed,
    slo_attainment,
)
from bench.autoscale_workloads import (
    LOAD_BUCKET_S,
    PATTERNS,
    AutoscaleWorkload,
    Burst,
    synthetic_workload,
    trace_workload,
)
from bench.errors import BenchUsageError
from bench.stats import BenchReport, BenchRow, Slo, compute_metrics
from bench.tables import format_table
from bench.workloads import LengthPool, load_length_pairs
from engines.core.engine import EngineCoreConfig

STRATEGIES: dict[str, ScalingStrategy] = {"hpa": "HPA", "kpa": "KPA", "apa": "APA"}
POLICIES = (*STRATEGIES, "fixed-min", "fixed-max")
TRACES = {"azure-code": "azure_code_2023.csv", "azure-conv": "azure_conv_2023.csv"}
WORKLOADS = (*TRACES, *PATTERNS)
SHAREGPT_FILE = "sharegpt_lengths.csv"
SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
FALLBACK_LENGTHS = LengthPool.fixed(1024, 256)
GPU = "h100"


class AutoscaleSummary(BaseModel):
    """The columns of the printed table (the JSON rows have every column)."""

    model_config = ConfigDict(extra="ignore")

    policy: str
    workload: str
    ttft_p99_s: float | None
    slo_attainment: float
    ttft_attainment: float
    tpot_attainment: float
    replica_seconds: float
    scale_events: int
    oscillations: int
    reaction_s: float | None


def summary(row: BenchRow) -> AutoscaleSummary:
    return AutoscaleSummary.model_validate(row.model_dump())


@dataclass(frozen=True, slots=True)
class Settings:
    engine: EngineCoreConfig
    slo: Slo
    min_replicas: int
    max_replicas: int
    cold_start_s: float
    oscillation_window_s: float
    target: float | None  # None: calibrated per request mix
    annotations: dict[str, dict[str, str]]  # policy -> its PodAutoscaler annotations
    calibration_s: float
    seed: int

    def bounds(self, initial: int) -> FleetBounds:
        return FleetBounds(self.min_replicas, self.max_replicas, initial, self.cold_start_s)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One workload under every policy."""

    workload: AutoscaleWorkload
    target: float
    calibration: Calibration | None  # None: the target came from --target
    burst: Burst | None
    needed: int | None  # replicas the burst's peak needs
    rows: list[BenchRow]
    timelines: dict[str, Timeline]
    needed_per_bucket: list[int]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "autoscale",
        help="HPA, KPA and APA vs fixed fleets on Azure traces and synthetic patterns (discrete-event simulation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    for name, file in TRACES.items():
        parser.add_argument(f"--{name}-trace", default=None, help=f"{file} (default: ../shared/data/traces/{file})")
    parser.add_argument("--sharegpt", default=None,
                        help=f"{SHAREGPT_FILE}: lengths for the synthetic patterns (default: ../shared/data/traces/, "
                             "else 1024 prompt and 256 output tokens)")  # fmt: skip
    parser.add_argument("--code-scale", type=float, default=4.0, help="load multiplier of the code trace")
    parser.add_argument("--conv-scale", type=float, default=16.0, help="load multiplier of the conversation trace")
    parser.add_argument("--peak-rate", type=float, default=40.0, help="req/s at the synthetic patterns' peak")
    parser.add_argument("--synthetic-duration", type=float, default=1800.0, help="seconds of each synthetic pattern")
    parser.add_argument("--trace-duration", type=float, default=None, help="replay only the first N s of each trace")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--target", type=float, default=None,
                        help="concurrent requests per replica the policies aim at (default: per request mix, "
                             "the concurrency of one replica at 70%% of its SLO capacity)")  # fmt: skip
    parser.add_argument("--knob", action="append", default=[], metavar="POLICY:NAME=VALUE",
                        help="a policy knob, as its PodAutoscaler annotation sets it (repeatable), e.g. "
                             "kpa:scale-down-delay=300s; default: every policy with its source's defaults")  # fmt: skip
    parser.add_argument("--cold-start", type=float, default=60.0, help="seconds from scale-up to a routable replica")
    parser.add_argument("--oscillation-window", type=float, default=300.0,
                        help="seconds within which a scale event reversing the last is an oscillation")  # fmt: skip
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="SLO, seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="SLO, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="under 3 minutes: the first 20 minutes of each trace, 10-minute synthetic patterns, "
                             "shorter calibration runs")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--plot", default=None, help="write a PNG of load and replicas over time per policy")
    parser.set_defaults(bench_run=run)


def _split(text: str, valid: tuple[str, ...], flag: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise BenchUsageError(f"{flag}: unknown {', '.join(unknown) or '(none)'}; valid: {', '.join(valid)}")
    return names


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.quick:
        args.trace_duration = args.trace_duration or 1200.0
        args.synthetic_duration = min(args.synthetic_duration, 600.0)
    if not 1 <= args.min_replicas <= args.max_replicas:
        raise BenchUsageError(
            f"need 1 <= --min-replicas <= --max-replicas, got {args.min_replicas}, {args.max_replicas}"
        )
    positive = {"--code-scale": args.code_scale, "--conv-scale": args.conv_scale, "--peak-rate": args.peak_rate,
                "--slo-ttft": args.slo_ttft, "--slo-tpot": args.slo_tpot,
                "--oscillation-window": args.oscillation_window, "--target": args.target}  # fmt: skip
    bad = [f"{flag} {value:g}" for flag, value in positive.items() if value is not None and value <= 0]
    if bad:
        raise BenchUsageError(f"{', '.join(bad)}: must be positive")
    if args.cold_start < 0:
        raise BenchUsageError(f"--cold-start {args.cold_start:g}: must be 0 or more seconds")
    for flag, seconds in (("--synthetic-duration", args.synthetic_duration), ("--trace-duration", args.trace_duration)):
        if seconds is not None and seconds < LOAD_BUCKET_S:
            raise BenchUsageError(f"{flag} {seconds:g}: at least {LOAD_BUCKET_S:g} s (load is measured per minute)")
    return Settings(
        EngineCoreConfig(gpu=GPU, seed=args.seed), Slo(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot), args.min_replicas,
        args.max_replicas, args.cold_start, args.oscillation_window, args.target, _annotations(args.knob),
        300.0 if args.quick else 600.0, args.seed,
    )  # fmt: skip


def _annotations(knobs: list[str]) -> dict[str, dict[str, str]]:
    """``POLICY:NAME=VALUE`` flags as each policy's annotations, checked as a PodAutoscaler would be."""
    annotations: dict[str, dict[str, str]] = {policy: {} for policy in STRATEGIES}
    for knob in knobs:
        policy, _, setting = knob.partition(":")
        name, equals, value = setting.partition("=")
        if policy not in STRATEGIES or not equals or not name:
            raise BenchUsageError(f"--knob {knob}: write POLICY:NAME=VALUE, POLICY one of {', '.join(STRATEGIES)}")
        annotations[policy][f"{ANNOTATION_PREFIX}/{name.strip()}"] = value.strip()
    for policy, given in annotations.items():
        try:
            settings_from_annotations(STRATEGIES[policy], given)
        except ValueError as exc:
            raise BenchUsageError(f"--knob {policy}: {exc}") from None
    return annotations


def _data_file(given: str | None, flag: str, name: str) -> Path | None:
    """The file the flag names (which must exist), else the shared copy if there is one."""
    if given is not None:
        if not Path(given).is_file():
            raise BenchUsageError(f"{flag} {given}: no such file")
        return Path(given)
    default = SHARED_TRACES / name
    return default if default.is_file() else None


def build_workloads(args: argparse.Namespace, notes: list[str]) -> list[AutoscaleWorkload]:
    names = _split(args.workloads, WORKLOADS, "--workloads")
    workloads = []
    for name in names:
        if name not in TRACES:
            continue
        flag = f"--{name}-trace"
        path = _data_file(getattr(args, f"{name.replace('-', '_')}_trace"), flag, TRACES[name])
        if path is None:
            notes.append(f"{name}: skipped, {TRACES[name]} is not in {SHARED_TRACES} (pass {flag} PATH)")
            continue
        scale = args.code_scale if name == "azure-code" else args.conv_scale
        workloads.append(trace_workload(name, path, scale, args.trace_duration, args.seed))
    patterns = [pattern for pattern in PATTERNS if pattern in names]
    if patterns:
        sharegpt = _data_file(args.sharegpt, "--sharegpt", SHAREGPT_FILE)
        if sharegpt is None:
            notes.append(f"synthetic patterns: no {SHAREGPT_FILE}, so requests have 1024 prompt and 256 output tokens")
            lengths, mix = FALLBACK_LENGTHS, "fixed 1024/256"
        else:
            lengths, mix = LengthPool.shuffled(load_length_pairs(sharegpt), args.seed), sharegpt.name
        workloads += [
            synthetic_workload(pattern, args.peak_rate, args.synthetic_duration, lengths, mix, args.seed)
            for pattern in patterns
        ]
    if not workloads:
        raise BenchUsageError("no workload left to run: pass the trace paths or choose synthetic patterns")
    return workloads


def simulate(workload: AutoscaleWorkload, policy: str, settings: Settings, target: float, initial: int) -> RunResult:
    """One run; a fixed fleet has no policy and sits at its bound from the start."""
    fixed = {"fixed-min": settings.min_replicas, "fixed-max": settings.max_replicas}
    scaler: ScalingPolicy | None = None
    if policy not in fixed:
        spec = autoscaler_spec(STRATEGIES[policy], settings.min_replicas, settings.max_replicas, target)
        scaler = build_policy(spec, settings.annotations[policy])
    bounds = settings.bounds(fixed.get(policy, initial))
    return AutoscaleSimulation(workload, settings.engine, scaler, bounds, settings.seed).run()


def policy_row(
    result: RunResult, policy: str, workload: AutoscaleWorkload, settings: Settings, burst: Burst | None,
    needed: int | None,
) -> BenchRow:  # fmt: skip
    records, slo = result.records, settings.slo
    metrics = compute_metrics(records, slo)
    reaction = reaction_time(result.timeline, burst.start_s, needed) if burst and needed else None
    return BenchRow.from_metrics(
        metrics, policy, workload.name, len(records) / workload.duration_s,
        slo_attainment=slo_attainment(records, slo),
        ttft_attainment=slo_attainment(records, Slo(ttft_s=slo.ttft_s)),
        tpot_attainment=slo_attainment(records, Slo(tpot_s=slo.tpot_s)),
        replica_seconds=round(result.replica_seconds, 1),
        mean_replicas=result.replica_seconds / result.end_s,
        scale_events=len(result.scale_events),
        oscillations=count_oscillations(result.scale_events, settings.oscillation_window_s),
        reaction_s=reaction,
        end_s=result.end_s,
    )  # fmt: skip


def evaluate(
    workload: AutoscaleWorkload,
    policies: list[str],
    settings: Settings,
    calibration: Calibration | None,
    log: Callable[[str], None],
) -> Evaluation:
    """Every policy on ``workload``, aiming at ``settings.target`` or else the calibrated one."""
    started = time.monotonic()
    if settings.target is not None:
        target = settings.target
    elif calibration is not None:
        target = round(calibration.target, 1)
    else:
        raise ValueError(f"{workload.name}: without --target the workload's request mix needs a calibration")
    reference = simulate(workload, "fixed-max", settings, target, settings.max_replicas)

    def needed_in(start_s: float) -> int:
        """What the load of the minute from ``start_s`` needs, as the reference measures it."""
        end_s = start_s + LOAD_BUCKET_S
        return replicas_needed(
            reference.timeline, start_s, end_s, target, settings.min_replicas, settings.max_replicas
        )

    burst = Burst.of(workload.offered_rps)
    needed = needed_in(burst.top_s) if burst else None
    initial = needed_in(0.0)
    rows, timelines = [], {}
    for policy in policies:
        result = reference if policy == "fixed-max" else simulate(workload, policy, settings, target, initial)
        rows.append(policy_row(result, policy, workload, settings, burst, needed))
        timelines[policy] = result.timeline
    per_bucket = [needed_in(i * LOAD_BUCKET_S) for i in range(len(workload.offered_rps))]
    log(f"  {workload.name}: {len(policies)} policies in {time.monotonic() - started:.0f} s")
    return Evaluation(workload, target, calibration, burst, needed, rows, timelines, per_bucket)


def _calibrate_mixes(
    workloads: list[AutoscaleWorkload], settings: Settings, log: Callable[[str], None]
) -> dict[str, Calibration]:
    """One calibration per request mix (the synthetic patterns share theirs)."""
    calibrations: dict[str, Calibration] = {}
    for workload in workloads:
        if workload.mix not in calibrations:
            lengths = LengthPool.shuffled([r.lengths for r in workload.requests], settings.seed)
            calibration = calibrate(lengths, settings.engine, settings.slo, settings.calibration_s, settings.seed)
            log(f"  {workload.mix}: one replica carries {calibration.capacity_rps:g} req/s within the SLO; "
                f"target {calibration.target:.1f} concurrent requests")  # fmt: skip
            calibrations[workload.mix] = calibration
    return calibrations


def _notes(evaluations: list[Evaluation], settings: Settings) -> list[str]:
    notes = []
    for ev in evaluations:
        how = (
            f"one replica carries {ev.calibration.capacity_rps:g} req/s of {ev.workload.mix} within the SLO; "
            f"the target is its concurrency at {TARGET_UTILISATION:.0%} of that"
            if ev.calibration else "--target"
        )  # fmt: skip
        burst = (
            f"largest rise from {ev.burst.start_s:g} s, peaking at {ev.burst.top_s:g} s, needs {ev.needed} replicas"
            if ev.burst else "no rise in load"
        )  # fmt: skip
        notes.append(f"{ev.workload.name}: {ev.workload.description}; target {ev.target:.1f} concurrent requests "
                     f"per replica ({how}); {burst}")  # fmt: skip
        by_policy = {row.policy: summary(row) for row in ev.rows}
        if "kpa" in by_policy and "hpa" in by_policy:
            kpa, hpa = by_policy["kpa"], by_policy["hpa"]
            notes.append(
                f"{ev.workload.name}: kpa meets the SLO for {kpa.slo_attainment:.1%} of requests, hpa for "
                f"{hpa.slo_attainment:.1%}, at {kpa.replica_seconds / hpa.replica_seconds:.2f}x hpa's replica-seconds"
            )
    hpa, kpa, apa = HpaSettings(), KpaSettings(), ApaSettings()
    notes += [
        (
            f"fleet: {settings.min_replicas}..{settings.max_replicas} simulated {GPU.upper()} engines (Llama-3.1-8B "
            "step-time model; vLLM's schedule kept as sums, see bench/autoscale_sim.py), least-request routing over "
            f"ready replicas, cold start {settings.cold_start_s:g} s; a removed replica drains before it stops; "
            "autoscaled fleets start at the first minute's need, as the fleet fixed at the maximum measures it"
        ),
        (
            f"metric: running + waiting requests per ready replica, sampled every {SAMPLE_INTERVAL_S:g} s into the "
            f"policy; the policies' default knobs: HPA {hpa.sync_period:g} s sync, "
            f"{hpa.scale_down_stabilization_window:g} s scale-down stabilization; KPA {kpa.stable_window:g} s stable "
            f"and {kpa.panic_window:g} s panic windows, {kpa.sync_period:g} s tick, {kpa.scale_down_delay:g} s scale-down delay; "
            f"APA {apa.window:g} s window, {apa.sync_period:g} s sync{_knobs_set(settings.annotations)}"
        ),
        (
            f"SLO: TTFT <= {settings.slo.ttft_s:g} s and TPOT <= {settings.slo.tpot_s:g} s; an oscillation reverses "
            f"the previous scale event within {settings.oscillation_window_s:g} s; reaction_s is sampled every "
            "second ('-': never reached)"
        ),
    ]
    return notes


def _knobs_set(annotations: dict[str, dict[str, str]]) -> str:
    knobs = [
        f"{policy}:{key.removeprefix(ANNOTATION_PREFIX + '/')}={value}"
        for policy, given in annotations.items()
        for key, value in given.items()
    ]
    return f"; set by --knob: {', '.join(knobs)}" if knobs else ""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = settings_from_args(args)
    policies = _split(args.policies, POLICIES, "--policies")
    notes: list[str] = []
    workloads = build_workloads(args, notes)
    if settings.target is None:
        _log("bench autoscale: concurrency targets")
    calibrations = {} if settings.target is not None else _calibrate_mixes(workloads, settings, _log)
    _log(f"bench autoscale: {len(workloads)} workloads x {len(policies)} policies")
    evaluations = [evaluate(w, policies, settings, calibrations.get(w.mix), _log) for w in workloads]
    rows = [row for ev in evaluations for row in ev.rows]
    notes = _notes(evaluations, settings) + notes + [f"took {time.monotonic() - started:.0f} s"]
    print(format_table(summary(row) for row in rows))
    print("\n".join(notes))
    if args.out:
        meta = {
            "seed": args.seed, "cold_start_s": settings.cold_start_s, "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas, "slo_ttft_s": settings.slo.ttft_s, "slo_tpot_s": settings.slo.tpot_s,
            "targets": {ev.workload.name: ev.target for ev in evaluations},
            "bursts": {ev.workload.name: {"start_s": ev.burst.start_s, "top_s": ev.burst.top_s, "needed": ev.needed}
                       for ev in evaluations if ev.burst},
        }  # fmt: skip
        BenchReport(bench="autoscale", rows=rows, notes=notes, meta=meta).write(args.out)
    if args.plot:
        from bench.plots import plot_autoscale

        plot_autoscale(
            {ev.workload.name: ev.workload.offered_rps for ev in evaluations},
            {ev.workload.name: ev.needed_per_bucket for ev in evaluations},
            {(ev.workload.name, policy): timeline for ev in evaluations for policy, timeline in ev.timelines.items()},
            LOAD_BUCKET_S,
            args.plot,
        )
    return 0
