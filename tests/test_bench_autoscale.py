"""``rayfleet bench autoscale``: the workloads' shapes, the batch engine against the real
``EngineCore``, the fleet's replica lifecycle (cold start, drain, cost), the policies'
reaction to a burst, and the command end to end. Pure Python on a virtual clock: no Ray."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoscaling import ScalingPolicy, build_policy
from bench.autoscale import Settings, evaluate, summary
from bench.autoscale_sim import (
    AutoscaleSimulation,
    FleetBounds,
    ScaleEvent,
    autoscaler_spec,
    count_oscillations,
)
from bench.autoscale_workloads import (
    LOAD_BUCKET_S,
    Burst,
    constant_workload,
    pattern_rate,
    scale_trace,
    synthetic_workload,
    trace_workload,
)
from bench.batch_engine import BatchEngine, SimRequest
from bench.cli import add_bench_parser, run_bench
from bench.stats import RequestRecord, Slo
from bench.workloads import LengthPool, Lengths, TracedRequest
from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.types import EngineRequest, SamplingSpec
from tests.conftest import SHARED_TRACES

SHORT = LengthPool.fixed(512, 128)
H100 = EngineCoreConfig(gpu="h100")


def _settings(target: float, max_replicas: int = 8, cold_start_s: float = 30.0) -> Settings:
    return Settings(H100, Slo(2.0, 0.1), 1, max_replicas, cold_start_s, 300.0, target,
                    {"hpa": {}, "kpa": {}, "apa": {}}, 300.0, 0)  # fmt: skip


# ---------------------------------------------------------------- workloads


def test_rising_patterns_climb_from_a_quarter_of_the_peak() -> None:
    peak, duration = 20.0, 1200.0
    quick = synthetic_workload("quick_rising", peak, duration, SHORT, "fixed")
    rise_bucket = int(duration / 5 / LOAD_BUCKET_S)  # the rise starts at D/5, on a bucket boundary here
    assert quick.offered_rps[:rise_bucket] == pytest.approx([peak / 4] * rise_bucket)
    assert quick.offered_rps[rise_bucket + 2 :] == pytest.approx([peak] * (len(quick.offered_rps) - rise_bucket - 2))
    assert Burst.of(quick.offered_rps) == Burst(rise_bucket * LOAD_BUCKET_S, (rise_bucket + 1) * LOAD_BUCKET_S,
                                                pytest.approx(0.75 * peak * 2 / np.pi, rel=0.01))  # fmt: skip
    slow = synthetic_workload("slow_rising", peak, duration, SHORT, "fixed")
    assert all(later > earlier for earlier, later in zip(slow.offered_rps, slow.offered_rps[1:]))
    assert pattern_rate("slow_rising", peak, duration)(np.array([0.0, duration])) == pytest.approx([peak / 4, peak])
    # Poisson arrivals that follow the rate: a quarter of the rate before the rise.
    before = sum(1 for r in quick.requests if r.send_at < duration / 5)
    after = sum(1 for r in quick.requests if r.send_at >= duration / 4)
    assert before / (duration / 5) == pytest.approx(peak / 4, rel=0.1)
    assert after / (duration * 3 / 4) == pytest.approx(peak, rel=0.05)


def test_fluctuation_patterns_keep_their_amplitude_and_period() -> None:
    peak, duration = 30.0, 1800.0
    t = np.linspace(0.0, duration, 180_001)
    for pattern, amplitude, periods in (("slight_fluctuation", 0.1, 1), ("severe_fluctuation", 0.5, 12)):
        rate = pattern_rate(pattern, peak, duration)(t)  # type: ignore[arg-type]
        mean = peak / (1 + amplitude)
        assert rate.max() == pytest.approx(peak) and rate.min() == pytest.approx(mean * (1 - amplitude))
        peaks = np.count_nonzero((rate[1:-1] > rate[:-2]) & (rate[1:-1] >= rate[2:]))
        assert peaks == periods
        workload = synthetic_workload(pattern, peak, duration, SHORT, "fixed")  # type: ignore[arg-type]
        assert len(workload.requests) == pytest.approx(mean * duration, rel=0.02)


def test_scaled_trace_keeps_its_seconds_and_multiplies_its_load() -> None:
    traced = [TracedRequest(float(i * 7 % 100), Lengths(100 + i, 10 + i)) for i in range(200)]
    scaled = scale_trace(traced, 2.5, seed=3)
    assert len(scaled) == pytest.approx(500, rel=0.1)
    assert [r.send_at for r in scaled] == sorted(r.send_at for r in scaled)
    originals = {r.send_at for r in traced}
    assert all(any(0 <= r.send_at - t < 1 for t in originals) for r in scaled)
    assert {r.lengths for r in scaled} <= {r.lengths for r in traced}
    assert len(scale_trace(traced, 0.5, seed=3)) == pytest.approx(100, rel=0.25)


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="shared traces not present")
def test_azure_code_trace_is_bursty_on_its_own_time_axis() -> None:
    workload = trace_workload("azure-code", SHARED_TRACES / "azure_code_2023.csv", 2.0, duration_s=1200.0)
    assert workload.duration_s == 1200.0 and len(workload.offered_rps) == 20
    assert workload.offered_rps[1] == 0.0 and max(workload.offered_rps) > 10.0  # silent minutes, then bursts
    burst = Burst.of(workload.offered_rps)
    assert burst is not None and workload.offered_rps[int(burst.start_s / LOAD_BUCKET_S) - 1] < burst.step_rps


def test_burst_is_the_rise_holding_the_largest_step() -> None:
    assert Burst.of([1, 1, 2, 6, 7, 7, 3]) == Burst(2 * LOAD_BUCKET_S, 4 * LOAD_BUCKET_S, 4)
    assert Burst.of([5, 4, 3]) is None


def test_oscillations_are_reversals_within_the_window() -> None:
    events = [ScaleEvent(0, 1, 4), ScaleEvent(100, 4, 2), ScaleEvent(200, 2, 1), ScaleEvent(900, 1, 3)]
    assert count_oscillations(events, 300.0) == 1  # up then down within 100 s; down then up after 700 s
    assert count_oscillations(events, 1000.0) == 2


# ---------------------------------------------------------------- the engine


def test_batch_engine_steps_exactly_like_the_engine_core() -> None:
    """Same step durations, the same requests' first tokens and completions, the same
    running + waiting count, step after step: chunked prefill (prompts longer than the
    token budget), the max_num_seqs limit, one-token replies and a second wave mid-run."""
    config = EngineCoreConfig(gpu="h100", max_num_seqs=6, max_num_batched_tokens=1024, enable_prefix_caching=False)
    core, batch = EngineCore(config), BatchEngine(config)
    rng = random.Random(1)
    lengths = [(rng.randint(1, 2500), rng.randint(1, 40)) for _ in range(30)]

    def add(index: int) -> None:
        prompt, output = lengths[index]
        ids = [rng.randrange(10, 1000) for _ in range(prompt)]
        core.add_request(EngineRequest(str(index), ids, SamplingSpec(max_tokens=output, ignore_eos=True, seed=index)))
        batch.add(SimRequest(RequestRecord(index, 0.0, 0.0), prompt, output))

    for index in range(20):
        add(index)
    steps = 0
    while core.has_unfinished_requests() or batch.has_work():
        if steps == 15:
            for index in range(20, 30):
                add(index)
        expected, got = core.step(), batch.step()
        assert got.duration_s == pytest.approx(expected.duration_s, abs=1e-12), steps
        assert sorted(r.record.index for r in got.first_tokens) == sorted(
            int(o.request_id) for o in expected.outputs if o.num_output_tokens == 1
        )
        assert sorted(r.record.index for r in got.finished) == sorted(
            int(o.request_id) for o in expected.outputs if o.finished
        )
        stats = core.stats()
        assert batch.concurrency == stats.num_running + stats.num_waiting
        steps += 1
    assert steps > 100 and 1 in [output for _, output in lengths]


# ---------------------------------------------------------------- the fleet


def _kpa(max_replicas: int, target: float) -> ScalingPolicy:
    """KPA without rayfleet's 5-minute scale-down delay, so that short workloads also scale down."""
    return build_policy(autoscaler_spec("KPA", 1, max_replicas, target), {"autoscaling.rayfleet.io/scale-down-delay": "0s"})


def test_a_new_replica_serves_nothing_before_its_cold_start_is_over() -> None:
    workload = synthetic_workload("quick_rising", 16.0, 600.0, SHORT, "fixed")
    result = AutoscaleSimulation(workload, H100, _kpa(6, 3.0), FleetBounds(1, 6, 1, 45.0)).run()
    late = [r for r in result.replicas if r.started_at > 0]
    assert late, "the burst should have started replicas"
    for replica in late:
        assert replica.ready_at == pytest.approx(replica.started_at + 45.0)
        assert replica.first_request_at is None or replica.first_request_at >= replica.ready_at
    served = [r for r in late if r.requests]
    assert served and all(r.first_request_at is not None for r in served)
    for at, ready, current in zip(result.timeline.times, result.timeline.ready, result.timeline.current):
        # The sample at an instant precedes the decision taken at it.
        booted = sum(1 for r in result.replicas if r.ready_at <= at and (r.removed_at is None or r.removed_at >= at))
        assert ready == booted and current >= ready


def test_scaling_down_drains_and_every_request_completes() -> None:
    long_replies = LengthPool.fixed(256, 1500)  # ~15 s of decoding: a removed replica still has work
    workload = synthetic_workload("severe_fluctuation", 12.0, 600.0, long_replies, "fixed")
    result = AutoscaleSimulation(workload, H100, _kpa(6, 16.0), FleetBounds(1, 6, 1, 20.0)).run()
    assert len(result.records) == len(workload.requests)
    assert all(r.output_tokens == 1500 and r.end > r.token_times[0] >= r.sent for r in result.records)
    drained = [r for r in result.replicas if r.removed_at is not None and r.stopped_at is not None]
    assert any(r.stopped_at > r.removed_at and r.requests for r in drained)  # type: ignore[operator]
    assert all(r.stopped_at is not None for r in result.replicas if r.removed_at is not None)
    assert result.end_s >= max(r.end for r in result.records)


def test_a_fixed_fleet_at_max_costs_max_times_the_run() -> None:
    workload = constant_workload(10.0, 300.0, SHORT, "fixed")
    result = AutoscaleSimulation(workload, H100, None, FleetBounds(1, 4, 4, 60.0)).run()
    assert result.end_s >= workload.duration_s
    assert result.replica_seconds == pytest.approx(4 * result.end_s)
    assert result.scale_events == [] and set(result.timeline.ready) == {4}
    assert all(r.requests > 0 for r in result.replicas)  # least-request spreads a steady load


def test_kpa_reacts_to_a_step_burst_faster_than_hpa() -> None:
    """KPA's panic window sees the burst within seconds and its 2 s tick acts on it; the HPA
    waits for its 15 s sync. Both then wait the same cold start."""
    workload = synthetic_workload("quick_rising", 16.0, 600.0, SHORT, "fixed")
    evaluation = evaluate(workload, ["hpa", "kpa", "fixed-max"], _settings(target=3.0), 3.0, lambda _: None)
    assert evaluation.burst is not None and evaluation.burst.start_s == 120.0 and evaluation.needed >= 4
    reaction = {row.policy: summary(row).reaction_s for row in evaluation.rows}
    assert reaction["fixed-max"] == 0.0
    assert reaction["kpa"] is not None and reaction["hpa"] is not None
    assert 30.0 <= reaction["kpa"] < reaction["hpa"]  # neither beats the cold start


# ---------------------------------------------------------------- the command


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return run_bench(parser.parse_args(["bench", *argv]))


def test_bench_autoscale_cli_end_to_end(tmp_path: Path) -> None:
    out, plot = tmp_path / "autoscale.json", tmp_path / "autoscale.png"
    command = [
        sys.executable, "-m", "rayfleet.cli", "bench", "autoscale", "--workloads", "quick_rising",
        "--synthetic-duration", "180", "--peak-rate", "6", "--max-replicas", "3", "--target", "20",
        "--cold-start", "20", "--knob", "kpa:stable-window=30s", "--out", str(out), "--plot", str(plot),
    ]  # fmt: skip
    finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "| kpa | quick_rising |" in finished.stdout and "kpa:stable-window=30s" in finished.stdout
    report = json.loads(out.read_text())
    assert report["bench"] == "autoscale" and report["meta"]["targets"] == {"quick_rising": 20.0}
    rows = report["rows"]
    assert [row["policy"] for row in rows] == ["hpa", "kpa", "apa", "fixed-min", "fixed-max"]
    for row in rows:
        assert {"policy", "workload", "slo_attainment", "replica_seconds", "scale_events"} <= row.keys()
        assert 0.0 <= row["slo_attainment"] <= 1.0 and row["replica_seconds"] > 0 and row["errors"] == 0
    assert rows[-1]["replica_seconds"] == pytest.approx(3 * rows[-1]["end_s"], abs=0.1)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-replicas", "0"], "--min-replicas"),
        (["--knob", "kpa:stable-window=2s"], "stable-window"),
        (["--knob", "hpa-no-colon"], "POLICY:NAME=VALUE"),
        (["--azure-code-trace", "/nonexistent.csv", "--workloads", "azure-code"], "no such file"),
        (["--workloads", "azure"], "unknown azure"),
    ],
)
def test_bench_autoscale_usage_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(["autoscale", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
