"""``rayfleet bench routing``: its workloads' sharing structure, the discrete-event fleet
(the real strategies over real ``EngineCore``s on a virtual clock), the saturation test,
and the command end to end, simulated and live (gateway and a peer router)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import add_bench_parser, run_bench
from bench.fleet_sim import FleetSimulation
from bench.routing import FleetSpec, Job, WorkloadSpec, hit_rate, imbalance, keeps_up, simulate
from bench.routing_live import parse_counters
from bench.routing_workloads import (
    MOONCAKE_BLOCK_TOKENS,
    azure_conversation,
    engine_answer,
    mooncake,
    multi_turn,
    shared_prefix,
)
from bench.stats import RequestRecord, Warmup
from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.types import EngineRequest, SamplingSpec
from serve_apps.routing import build_strategy
from tests.conftest import SHARED_TRACES, free_port

SMALL_GSP = WorkloadSpec("gsp-uniform", groups=16, prompts_per_group=8, system_prompt_len=512, question_len=32,
                         output_len=32)  # fmt: skip


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return run_bench(parser.parse_args(["bench", *argv]))


# ---------------------------------------------------------------- workloads


def test_shared_prefix_groups_share_exactly_their_system_prompt() -> None:
    workload = shared_prefix(num_groups=6, prompts_per_group=4, system_prompt_len=64, question_len=8, output_len=5)
    assert len(workload.requests) == 24 and workload.name == "gsp-uniform"
    by_prefix: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for request in workload.requests:
        assert len(request.token_ids) == 72 and request.max_tokens == 5
        by_prefix.setdefault(request.token_ids[:64], []).append(request.token_ids[64:])
    assert sorted(len(questions) for questions in by_prefix.values()) == [4] * 6
    assert all(len(set(questions)) == 4 for questions in by_prefix.values())  # distinct questions
    zipf = shared_prefix(num_groups=50, prompts_per_group=20, system_prompt_len=16, question_len=4,
                         distribution="zipf", zipf_alpha=1.2)  # fmt: skip
    counts = sorted((sum(r.token_ids[:16] == p for r in zipf.requests) for p in {r.token_ids[:16] for r in zipf.requests}),
                    reverse=True)  # fmt: skip
    assert sum(counts) == 1000 and counts[0] > 5 * 20  # the head group is far above uniform's 20


def test_rates_scale_the_same_requests() -> None:
    workload = shared_prefix(num_groups=4, prompts_per_group=4, system_prompt_len=16, question_len=4, output_len=2)
    fast = workload.at_rate(8.0)
    assert [r.token_ids for r in fast.requests] == [r.token_ids for r in workload.requests]
    assert fast.requests[-1].send_at == pytest.approx(workload.requests[-1].send_at / 8)
    assert len(fast.head(5).requests) == 5
    with pytest.raises(ValueError, match="rate"):
        workload.at_rate(0)


def test_multi_turn_resends_the_history_the_engine_answered() -> None:
    """Turn k+1's prompt is turn k's prompt, then the engine's actual answer, then a new
    question; the answer is computed from the request's seed, and a real EngineCore given
    that seed generates exactly it."""
    workload = multi_turn(num_sessions=2, turns=3, system_prompt_len=32, question_len=8, answer_len=6, turn_gap_s=5)
    turns = sorted((r for r in workload.requests if r.session == "s0"), key=lambda r: r.send_at)
    assert len(turns) == 3
    core = EngineCore(EngineCoreConfig(gpu="instant"))
    core.add_request(EngineRequest("t0", list(turns[0].token_ids), SamplingSpec(6, ignore_eos=True, seed=turns[0].seed)))
    generated: list[int] = []
    while core.has_unfinished_requests():
        for output in core.step().outputs:
            generated += output.new_token_ids
    assert tuple(generated) == engine_answer(turns[0].seed, 6)
    for earlier, later in zip(turns, turns[1:]):
        expected_head = earlier.token_ids + engine_answer(earlier.seed, 6)
        assert later.token_ids[: len(expected_head)] == expected_head
        assert len(later.token_ids) == len(expected_head) + 8


def test_mooncake_blocks_repeat_where_hash_ids_repeat(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1000, "output_length": 7, "hash_ids": [0, 1]}\n'
        '{"timestamp": 500, "input_length": 1100, "output_length": 9, "hash_ids": [0, 2, 3]}\n'
    )
    workload = mooncake(trace)
    first, second = workload.requests
    assert len(first.token_ids) == 1000 and len(second.token_ids) == 1100 and second.send_at == 0.5
    assert first.token_ids[:MOONCAKE_BLOCK_TOKENS] == second.token_ids[:MOONCAKE_BLOCK_TOKENS]
    assert first.token_ids[MOONCAKE_BLOCK_TOKENS:] != second.token_ids[MOONCAKE_BLOCK_TOKENS:1000]
    trace.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="hash_ids"):
        mooncake(trace)


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="shared traces not present")
def test_shared_traces_become_routing_workloads() -> None:
    conv = azure_conversation(SHARED_TRACES / "azure_conv_2023.csv", max_requests=300)
    assert len(conv.requests) == 300 and len({r.token_ids[:16] for r in conv.requests}) == 300
    cake = mooncake(SHARED_TRACES / "mooncake_conversation.jsonl", max_requests=300)
    assert len(cake.requests) == 300
    assert len({r.token_ids[:MOONCAKE_BLOCK_TOKENS] for r in cake.requests}) == 1  # every row shares block 0


# ---------------------------------------------------------------- the discrete-event fleet


def test_fleet_simulation_serves_every_request_and_prefix_routing_hits_the_cache() -> None:
    results = {}
    for policy in ("random", "prefix-cache-and-load"):
        results[policy] = simulate(Job(policy, SMALL_GSP, 20.0, None, FleetSpec(engines=4), 0.25, 0))
    for result in results.values():
        assert len(result.records) == 128 and all(r.ok and r.output_tokens == 32 for r in result.records)
        assert all(len(r.token_times) == 32 and r.ttft is not None and r.ttft > 0 for r in result.records)
        # Engine counters cover the measured window: its 96 requests and warm-up ones still finishing.
        assert 96 <= sum(c.requests for c in result.engine_counters) < 128
    random_hits = hit_rate(results["random"].engine_counters)
    prefix_hits = hit_rate(results["prefix-cache-and-load"].engine_counters)
    assert random_hits is not None and prefix_hits is not None and prefix_hits > random_hits + 0.2
    assert imbalance(results["prefix-cache-and-load"].engine_counters) < 2.0


def test_fleet_simulation_is_deterministic_per_seed() -> None:
    def ttfts(seed: int) -> list[float | None]:
        return [r.ttft for r in simulate(Job("power-of-two", SMALL_GSP, 30.0, None, FleetSpec(engines=3), 0.0, seed)).records]

    assert ttfts(1) == ttfts(1)
    assert ttfts(1) != ttfts(2)


def test_signal_strategies_run_on_the_virtual_clock() -> None:
    """Strategies that age their signals read the simulation's clock, not the wall's: with
    scrapes every 0.5 virtual seconds least-kv-cache never falls back, in a run that takes
    far less wall time than virtual time."""
    from serve_apps.routing.fallback import FALLBACKS

    before = FALLBACKS.snapshot()
    simulation = FleetSimulation(3, EngineCoreConfig(gpu="h100"), lambda rng, clock: build_strategy("least-kv-cache", rng, clock))
    workload = shared_prefix(num_groups=4, prompts_per_group=10, system_prompt_len=256, question_len=16, output_len=64)
    result = simulation.run(workload.at_rate(4.0))
    assert len(result.records) == 40 and all(r.ok for r in result.records)
    assert FALLBACKS.snapshot() == before


def test_events_index_beats_approximate_when_replicas_split_the_history() -> None:
    """Four gateway replicas each remember only their own decisions, so an approximate
    index scatters a system prompt over several engines and the caches thrash; the
    KV-event index is one truth for all of them. Same requests, same fleet, same seeds."""
    workload = shared_prefix(num_groups=24, prompts_per_group=8, system_prompt_len=512, question_len=16,
                             output_len=16).at_rate(30.0)  # fmt: skip
    config = EngineCoreConfig(gpu="h100", num_gpu_blocks=400)  # ~6 system prompts per engine; 24 need all 4

    def hits(mode: str) -> float:
        simulation = FleetSimulation(
            4, config, lambda rng, clock: build_strategy("prefix-cache-and-load", rng, clock), seed=3,
            prefix_index=mode, gateway_replicas=4,
        )  # fmt: skip
        result = simulation.run(workload, workload.requests[48].send_at)
        assert all(r.ok for r in result.records)
        rate = hit_rate(result.engine_counters)
        assert rate is not None
        return rate

    assert hits("events") > hits("approximate") + 0.1


def test_keeps_up_compares_completions_with_arrivals() -> None:
    def records(service_gap: float) -> list[RequestRecord]:
        # One arrival per second; each request ends 3 s after it arrives, or queues behind the previous one.
        out, end = [], 0.0
        for i in range(100):
            end = max(end, float(i)) + service_gap
            out.append(RequestRecord(index=i, scheduled=float(i), sent=float(i), end=end + 3.0, status=200))
        return out

    assert keeps_up(records(0.5), Warmup(requests=10))
    assert not keeps_up(records(1.2), Warmup(requests=10))


def test_engine_counters_parse_from_metrics_text() -> None:
    text = (
        'vllm:request_success_total{finished_reason="length",model_name="m"} 3.0\n'
        'vllm:request_success_total{finished_reason="stop",model_name="m"} 2.0\n'
        'vllm:prefix_cache_queries_total{model_name="m"} 100.0\n'
        'vllm:prefix_cache_hits_total{model_name="m"} 40.0\n'
        "# HELP vllm:num_preemptions_total x\n"
        'vllm:num_preemptions_total{model_name="m"} 1.0\n'
    )
    counters = parse_counters(text)
    assert (counters.requests, counters.prefix_queries, counters.prefix_hits, counters.preemptions) == (5, 100, 40, 1)


# ---------------------------------------------------------------- the command


def test_simulated_sweep_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plot = tmp_path / "routing.json", tmp_path / "routing.png"
    code = _bench([
        "routing", "--mode", "des", "--engines", "3", "--groups", "12", "--prompts-per-group", "6",
        "--system-prompt-len", "512", "--question-len", "32", "--output-len", "32", "--load", "0.5,0.9",
        "--policies", "random,prefix-cache-and-load", "--peers", "none", "--jobs", "1",
        "--out", str(out), "--plot", str(plot),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert "| policy |" in printed.out and "random saturates at" in printed.out
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["policy"], r["load"]) for r in rows} == {
        (p, load) for p in ("random", "prefix-cache-and-load") for load in (0.5, 0.9)
    }
    assert all(r["run"] == "des" and r["errors"] == 0 and 0 <= r["hit_rate"] <= 1 and r["imbalance"] >= 1 for r in rows)
    assert report["meta"]["saturation_rps"]["gsp-uniform"] > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workloads", "nope"], "unknown workload(s) nope; valid: gsp-uniform"),
        (["--workloads", "azure-conv"], "workload azure-conv needs --azure-trace PATH"),
        (["--policies", "fastest"], "unknown policy fastest; valid:"),
        (["--peers", "sglang-router:magic"], "sglang-router has no policy 'magic'"),
        (["--gpu", "tpu"], "--gpu tpu:"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench(["routing", "--mode", "des", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.timeout(600)
def test_live_run_through_the_gateway_and_a_peer(tmp_path: Path) -> None:
    """The live path end to end, as a user runs it (its own Ray cluster in a subprocess):
    two engines on a slowed clock, one of our strategies by header and sglang-router in
    front of the same engines, rows in engine seconds with counters from the engines."""
    out = tmp_path / "live.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(RAY_ADDRESS="", RAYFLEET_HOME=os.environ.get("RAYFLEET_HOME", str(Path.home() / ".rayfleet")))
    command = [
        sys.executable, "-m", "rayfleet.cli", "bench", "routing", "--mode", "live", "--engines", "2",
        "--groups", "4", "--prompts-per-group", "6", "--system-prompt-len", "256", "--question-len", "16",
        "--output-len", "16", "--rates", "4", "--live-requests", "24", "--time-scale", "2",
        "--policies", "prefix-cache-and-load", "--peers", "sglang-router:cache_aware",
        "--port", str(free_port()), "--out", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["prefix-cache-and-load", "sglang-router:cache_aware"]
    assert [r["mode"] for r in rows] == ["approximate", "sglang-router:cache_aware"]
    for row in rows:
        assert row["run"] == "live" and row["errors"] == 0 and row["completed"] > 0
        assert row["hit_rate"] > 0 and row["ttft_p50_s"] < 5.0  # engine seconds, not wall seconds
