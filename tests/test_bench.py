"""The benchmark toolkit: arrivals, traces, prompts, metric definitions, the load
generator against real sockets, and ``bench serve`` end to end against the simulator."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen
from bench.cli import add_bench_parser, run_bench
from bench.client_ceiling import (
    completion_response,
    completion_stream_response,
    fixed_response_server,
    http_response,
)
from bench.stats import BenchReport, BenchRow, RequestRecord, Slo, Warmup, compute_metrics
from bench.tables import format_table
from bench.workloads import (
    LengthPool,
    Lengths,
    PromptBuilder,
    RequestSpec,
    Workload,
    count_for_duration,
    gamma_arrivals,
    load_azure_trace,
    load_length_pairs,
    offered_rate,
)
from engines.core.tokenizer import get_tokenizer
from rayfleet.ports import free_port
from tests.conftest import SHARED_TRACES as TRACES
from tests.simulator_fixtures import DEFAULT_MODEL, SimulatorProcess


# ---------------------------------------------------------------- arrivals


def test_arrivals_are_seeded() -> None:
    assert gamma_arrivals(10.0, 50, seed=3) == gamma_arrivals(10.0, 50, seed=3)
    assert gamma_arrivals(10.0, 50, seed=3) != gamma_arrivals(10.0, 50, seed=4)
    assert gamma_arrivals(10.0, 50, 0.5, seed=3) != gamma_arrivals(10.0, 50, 1.0, seed=3)


def test_arrivals_mean_rate_is_exact() -> None:
    for burstiness in (0.3, 1.0, 4.0):
        times = gamma_arrivals(25.0, 400, burstiness, seed=1)
        assert len(times) == 400
        assert times == sorted(times) and times[0] > 0
        assert times[-1] == pytest.approx(400 / 25.0)
        assert offered_rate(times) == pytest.approx(25.0)


def test_burstiness_sets_the_gap_spread() -> None:
    """Gamma(shape k) gaps have a coefficient of variation of 1/sqrt(k)."""
    for burstiness in (0.25, 1.0, 4.0):
        gaps = np.diff([0.0, *gamma_arrivals(5.0, 20_000, burstiness, seed=7)])
        cv = gaps.std() / gaps.mean()
        assert cv == pytest.approx(1 / np.sqrt(burstiness), rel=0.1)


def test_arrival_arguments_are_checked() -> None:
    assert count_for_duration(2.5, 10) == 25
    assert count_for_duration(0.01, 1) == 1
    assert gamma_arrivals(1.0, 0) == []
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 5)
    with pytest.raises(ValueError):
        gamma_arrivals(1.0, 5, burstiness=0.0)


# ---------------------------------------------------------------- traces and length sources


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_azure_trace_scaling_offset_and_caps(tmp_path: Path) -> None:
    trace = _write(
        tmp_path / "trace.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,100,10\n2.0,200,20\n5.0,300,30\n9.0,400,40\n",
    )
    full = load_azure_trace(trace)
    assert [r.send_at for r in full] == [0.0, 2.0, 5.0, 9.0]
    assert [r.lengths for r in full][1] == Lengths(200, 20)
    assert [r.send_at for r in load_azure_trace(trace, time_scale=0.1)] == pytest.approx([0.0, 0.2, 0.5, 0.9])
    shifted = load_azure_trace(trace, time_scale=0.5, start_s=2.0)
    assert [r.send_at for r in shifted] == pytest.approx([0.0, 1.5, 3.5])
    assert len(load_azure_trace(trace, max_requests=2)) == 2
    # duration is in replayed seconds: 0.1 x 9 s = 0.9 s is outside a 0.6 s window
    assert len(load_azure_trace(trace, time_scale=0.1, duration_s=0.6)) == 3


def test_trace_and_dataset_need_their_columns(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.csv", "time,prompt\n0,1\n")
    with pytest.raises(ValueError, match="arrived_at"):
        load_azure_trace(bad)
    with pytest.raises(ValueError, match="num_prefill_tokens"):
        load_length_pairs(bad)


def test_length_pairs_and_pools(tmp_path: Path) -> None:
    pairs_csv = _write(
        tmp_path / "pairs.csv",
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n10,5,15,2\n0,5,5,0\n7,3,10,2.3\n",
    )
    pairs = load_length_pairs(pairs_csv)
    assert pairs == [Lengths(10, 5), Lengths(7, 3)]  # the empty prompt is dropped
    pool = LengthPool.shuffled(pairs * 10, seed=1)
    assert pool.pairs == LengthPool.shuffled(pairs * 10, seed=1).pairs
    assert pool(0) == pool(20)  # cycles
    assert LengthPool.fixed(4, 2)(99) == Lengths(4, 2)
    with pytest.raises(ValueError):
        LengthPool.fixed(0, 2)


@pytest.mark.skipif(not TRACES.is_dir(), reason="shared traces not present")
def test_shared_traces_load() -> None:
    conv = load_azure_trace(TRACES / "azure_conv_2023.csv", time_scale=0.1, max_requests=500)
    assert len(conv) == 500 and conv[0].send_at == 0.0
    assert all(b.send_at >= a.send_at for a, b in zip(conv, conv[1:]))
    unscaled = load_azure_trace(TRACES / "azure_conv_2023.csv", max_requests=500)
    assert conv[-1].send_at == pytest.approx(unscaled[-1].send_at * 0.1)
    pairs = load_length_pairs(TRACES / "sharegpt_lengths.csv")
    assert len(pairs) > 30_000 and all(p.prompt >= 1 and p.output >= 1 for p in pairs)


# ---------------------------------------------------------------- prompts


def test_prompts_have_exact_lengths_and_unique_prefixes() -> None:
    tokenizer = get_tokenizer()
    builder = PromptBuilder(tokenizer, seed=5, salt=9)
    for index, length in ((0, 1), (1, 3), (2, 17), (3, 1000)):
        assert len(tokenizer.encode(builder.text(index, length))) == length
    heads = {tuple(builder.token_ids(index, 16)) for index in range(200)}
    assert len(heads) == 200
    assert builder.text(4, 50) == PromptBuilder(tokenizer, seed=5, salt=9).text(4, 50)
    salted = PromptBuilder(tokenizer, seed=5, salt=10)
    assert salted.token_ids(4, 50)[0] != builder.token_ids(4, 50)[0]
    assert salted.token_ids(4, 50)[3:] == builder.token_ids(4, 50)[3:]


def test_workload_specs_follow_the_api() -> None:
    tokenizer = get_tokenizer()
    workload = Workload("w", "chat", LengthPool.fixed(12, 3), PromptBuilder(tokenizer), {"x-tenant": "a"})
    chat = workload.specs([0.0, 0.5])
    assert [s.send_at for s in chat] == [0.0, 0.5]
    assert chat[0].prompt is None and chat[0].messages is not None
    assert len(tokenizer.encode(chat[0].messages[0]["content"])) == 12
    assert chat[0].max_tokens == 3 and chat[0].ignore_eos and chat[0].headers == {"x-tenant": "a"}
    completions = Workload("w", "completions", LengthPool.fixed(12, 3), PromptBuilder(tokenizer)).spec(0)
    assert completions.messages is None and completions.prompt == chat[0].messages[0]["content"]
    assert workload.salted(3).spec(0).messages != chat[0].messages


# ---------------------------------------------------------------- metric definitions


def _streamed(index: int, sent: float, tokens: list[float], output_tokens: int | None = None) -> RequestRecord:
    return RequestRecord(
        index=index,
        scheduled=sent,
        sent=sent,
        end=tokens[-1],
        token_times=tokens,
        output_tokens=len(tokens) if output_tokens is None else output_tokens,
        prompt_tokens=10,
        status=200,
    )


def test_metric_definitions_on_hand_made_records() -> None:
    records = [
        _streamed(0, 0.0, [0.2, 0.3, 0.5]),  # ttft .2, tpot (.5-.2)/2 = .15, itl .1 .2
        _streamed(1, 1.0, [1.4, 1.5]),  # ttft .4, tpot .1, itl .1
        _streamed(2, 2.0, [2.1]),  # ttft .1, one token: no tpot, no itl
        _streamed(3, 3.0, [3.3, 3.9], output_tokens=4),  # two chunks, 4 tokens: tpot .6/3 = .2
        RequestRecord(index=4, scheduled=4.0, sent=4.0, end=4.5, status=503, error="overloaded"),
    ]
    metrics = compute_metrics(records, Slo(ttft_s=0.3, tpot_s=0.16))
    assert metrics.completed == 4 and metrics.errors == 1
    assert metrics.duration_s == pytest.approx(4.5)
    assert metrics.ttft.mean == pytest.approx((0.2 + 0.4 + 0.1 + 0.3) / 4)
    assert metrics.ttft.p50 == pytest.approx(0.25)
    assert sorted([0.15, 0.1, 0.2]) == pytest.approx(sorted([r.tpot for r in records[:4] if r.tpot]))
    assert metrics.tpot.count == 3 and metrics.tpot.p50 == pytest.approx(0.15)
    assert metrics.itl.count == 4 and metrics.itl.mean == pytest.approx((0.1 + 0.2 + 0.1 + 0.6) / 4)
    assert metrics.e2e.p50 == pytest.approx(np.percentile([0.5, 0.5, 0.1, 0.9], 50))
    # good: #0 (ttft .2, tpot .15) and #2 (ttft .1, tpot counts as 0); #1 ttft .4 > .3; #3 tpot .2 > .16
    assert metrics.good == 2
    assert metrics.output_tokens == 3 + 2 + 1 + 4 and metrics.input_tokens == 40
    assert compute_metrics(records).good is None

    row = BenchRow.from_metrics(metrics, policy="p", workload="w", offered_rps=1.0, hit_rate=0.5)
    assert row.achieved_rps == pytest.approx(4 / 4.5) and row.goodput_rps == pytest.approx(2 / 4.5)
    assert row.output_tok_s == pytest.approx(10 / 4.5) and row.errors == 1
    assert row.model_dump()["hit_rate"] == 0.5


def test_e2e_slo_and_unstreamed_requests() -> None:
    plain = RequestRecord(index=0, scheduled=0.0, sent=0.0, end=0.4, output_tokens=8, status=200)
    assert plain.ttft is None and plain.tpot is None
    assert Slo(e2e_s=0.5).met_by(plain) and not Slo(e2e_s=0.3).met_by(plain)
    assert not Slo(ttft_s=10.0).met_by(plain)  # no TTFT measured, so it cannot be shown to meet one
    metrics = compute_metrics([plain], Slo(e2e_s=0.5))
    assert metrics.ttft.p50 is None and metrics.e2e.p50 == pytest.approx(0.4) and metrics.good == 1


def test_warmup_excludes_the_head_of_the_run() -> None:
    records = [_streamed(i, float(i), [i + 0.5]) for i in range(10)]
    by_count = compute_metrics(records, warmup=Warmup(requests=4))
    assert by_count.completed == 6
    assert by_count.duration_s == pytest.approx(9.5 - 3.0)  # from the last warm-up send
    by_time = compute_metrics(records, warmup=Warmup(seconds=2.5))
    assert by_time.completed == 7 and by_time.duration_s == pytest.approx(9.5 - 2.5)
    assert compute_metrics(records, warmup=Warmup(requests=20)).completed == 0


def test_report_json_shape(tmp_path: Path) -> None:
    row = BenchRow.from_metrics(compute_metrics([_streamed(0, 0.0, [0.1, 0.2])]), "p", "w", concurrency=8, mode="x")
    out = tmp_path / "report.json"
    BenchReport(bench="serve", rows=[row], notes=["n"], meta={"seed": 0}).write(out)
    data = json.loads(out.read_text())
    assert set(data) == {"bench", "rows", "notes", "meta"} and data["bench"] == "serve"
    keys = set(data["rows"][0])
    assert {
        "policy", "workload", "offered_rps", "achieved_rps", "goodput_rps", "ttft_p50_s", "ttft_p90_s",
        "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s", "output_tok_s",
        "errors", "completed", "concurrency", "ttft_mean_s", "e2e_mean_s", "mode",
    } <= keys  # fmt: skip
    header, _, values = format_table([row]).splitlines()
    assert "| TTFT p50 (ms) |" in header and header.endswith("| mode |")  # extras come last
    assert "| 100.0 |" in values and values.endswith("| x |")  # a 0.1 s TTFT shown in ms


# ---------------------------------------------------------------- the load generator on real sockets


def _spec(max_tokens: int = 4) -> RequestSpec:
    return RequestSpec(send_at=0.0, api="completions", prompt_len=2, max_tokens=max_tokens, prompt=" a b")


def _open_loop(url: str, count: int, stream: bool = True, timeout_s: float = 10.0) -> list[RequestRecord]:
    request = loadgen.prepare(_spec(), loadgen.Target(url, "m", stream=stream, timeout_s=timeout_s))
    times = [0.01 * i for i in range(count)]
    return loadgen.run(loadgen.run_open_loop([request] * count, times, timeout_s))


def test_prepare_builds_vllm_bodies() -> None:
    spec = RequestSpec(0.0, "chat", 3, 7, messages=[{"role": "user", "content": "x"}], user="u", session="s1")
    request = loadgen.prepare(spec, loadgen.Target("http://h:1/", "m", stream=True, api_key="k"))
    body = json.loads(request.body)
    assert request.url == "http://h:1/v1/chat/completions"
    assert body["max_completion_tokens"] == 7 and body["ignore_eos"] is True and body["user"] == "u"
    assert body["stream_options"] == {"include_usage": True}
    assert request.headers["Authorization"] == "Bearer k" and request.headers[loadgen.SESSION_HEADER] == "s1"
    plain = json.loads(loadgen.prepare(_spec(), loadgen.Target("http://h:1", "m", stream=False)).body)
    assert "stream" not in plain and plain["max_tokens"] == 4 and plain["prompt"] == " a b"


def test_streamed_and_plain_answers_are_parsed() -> None:
    with fixed_response_server(completion_stream_response(5)) as url:
        records = _open_loop(url, 6)
    assert all(r.ok and r.status == 200 for r in records)
    assert all(len(r.token_times) == 5 and r.output_tokens == 5 and r.prompt_tokens == 8 for r in records)
    assert all(r.ttft is not None and r.end == r.token_times[-1] for r in records)
    with fixed_response_server(completion_response(7)) as url:
        records = _open_loop(url, 3, stream=False)
    assert all(r.ok and r.output_tokens == 7 and r.ttft is None and r.e2e > 0 for r in records)


def test_failures_become_errors_not_exceptions() -> None:
    with fixed_response_server(http_response(b'{"error": "boom"}', status="500 Internal Server Error")) as url:
        failed = _open_loop(url, 4)
    assert all(r.status == 500 and r.error == '{"error": "boom"}' for r in failed)
    truncated = http_response(b'data: {"choices": [{"text": " a"}]}\n\n', "text/event-stream")
    with fixed_response_server(truncated) as url:
        cut = _open_loop(url, 2)
    assert all(r.error == "stream ended before data: [DONE]" for r in cut)
    refused = _open_loop(f"http://127.0.0.1:{free_port()}", 3)
    assert all(r.status == 0 and r.error and "Connect" in r.error for r in refused)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hung = _open_loop(f"http://127.0.0.1:{silent.getsockname()[1]}", 2, timeout_s=0.3)
    assert all(r.error and "within 0.3 s" in r.error for r in hung)
    assert compute_metrics(failed + refused).errors == 7


def test_closed_loop_honours_count_and_concurrency() -> None:
    with fixed_response_server(completion_stream_response(3)) as url:
        request = loadgen.prepare(_spec(), loadgen.Target(url, "m"))
        records = loadgen.run(loadgen.run_closed_loop(lambda _: request, 4, 10.0, max_requests=25))
        timed = loadgen.run(loadgen.run_closed_loop(lambda _: request, 2, 10.0, duration_s=0.2))
    assert sorted(r.index for r in records) == list(range(25)) and all(r.ok for r in records)
    assert timed and all(r.ok for r in timed)
    with pytest.raises(ValueError):
        loadgen.run(loadgen.run_closed_loop(lambda _: request, 1, 1.0))


# ---------------------------------------------------------------- the CLI


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rayfleet")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return run_bench(parser.parse_args(["bench", *argv]))


def test_usage_errors_are_one_line_with_the_fix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    base = ["serve", "--model", "m"]
    assert _bench([*base, "--trace", "azure", "--trace-path", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: trace file {missing} not found: pass --trace-path to a CSV with "
        "arrived_at,num_prefill_tokens,num_decode_tokens"
    )
    assert _bench(base) == 2
    assert "--rate R" in capsys.readouterr().err
    assert _bench([*base, "--rate", "1", "--dataset", "sharegpt"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
    assert _bench([*base, "--rate", "1", "--no-stream", "--slo-ttft", "1"]) == 2
    assert "--no-stream" in capsys.readouterr().err


def test_serve_reports_a_failing_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "fail.json"
    with fixed_response_server(http_response(b"down", status="503 Service Unavailable")) as url:
        code = _bench(["serve", "--url", url, "--model", "m", "--rate", "200", "--num-requests", "5",
                       "--input-len", "8", "--output-len", "2", "--out", str(out)])  # fmt: skip
    assert code == 1
    report = json.loads(out.read_text())
    assert report["rows"][0]["errors"] == 5 and report["rows"][0]["completed"] == 0
    assert "HTTP 503: down" in " ".join(report["notes"])
    assert "| errors |" in capsys.readouterr().out


# ---------------------------------------------------------------- end to end against the simulator
# (``simulator`` is the shared module-scoped instant-GPU simulator from tests/simulator_fixtures.py)


def test_serve_open_loop_streaming_with_direct(simulator: SimulatorProcess, tmp_path: Path) -> None:
    out = tmp_path / "open.json"
    code = _bench([
        "serve", "--url", simulator.url, "--model", DEFAULT_MODEL, "--api", "chat", "--rate", "100",
        "--burstiness", "0.5", "--num-requests", "30", "--input-len", "64", "--output-len", "6",
        "--warmup", "5", "--slo-ttft", "5", "--slo-e2e", "10", "--direct", simulator.url,
        "--policy", "gw", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["policy"] for row in report["rows"]] == ["gw", "direct"]
    for row in report["rows"]:
        assert row["completed"] == 25 and row["errors"] == 0
        assert row["offered_rps"] == pytest.approx(100.0)
        assert row["goodput_rps"] == pytest.approx(row["achieved_rps"])
        assert 0 < row["ttft_p50_s"] <= row["e2e_p50_s"] and row["tpot_p50_s"] is not None
        assert row["output_tok_s"] == pytest.approx(6 * row["achieved_rps"])
    assert any(note.startswith("gateway added latency: TTFT p50") for note in report["notes"])
    assert report["meta"]["runs"][0]["sent"] == 30


def test_serve_closed_loop_and_unstreamed(simulator: SimulatorProcess, tmp_path: Path) -> None:
    out = tmp_path / "closed.json"
    common = ["serve", "--url", simulator.url, "--model", DEFAULT_MODEL, "--concurrency", "4", "--num-requests", "24",
              "--input-len", "32", "--output-len", "5"]  # fmt: skip
    assert _bench([*common, "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["completed"] == 24 and row["concurrency"] == 4 and row["offered_rps"] is None
    assert row["output_tok_s"] == pytest.approx(5 * row["achieved_rps"])
    assert _bench([*common, "--no-stream", "--slo-e2e", "10", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["completed"] == 24 and row["ttft_p50_s"] is None and row["e2e_p50_s"] > 0


@pytest.mark.skipif(not TRACES.is_dir(), reason="shared traces not present")
def test_serve_replays_a_trace(simulator: SimulatorProcess, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    code = _bench([
        "serve", "--url", simulator.url, "--model", DEFAULT_MODEL, "--trace", "azure",
        "--trace-path", str(TRACES / "azure_code_2023.csv"), "--trace-time-scale", "0.05",
        "--num-requests", "20", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["workload"] == "azure_code_2023" and row["completed"] == 20 and row["errors"] == 0
