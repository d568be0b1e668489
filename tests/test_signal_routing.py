"""Signal-driven routing: each strategy on hand-made state, the metrics parser on a real
simulator's ``/metrics``, and the scraper against two live simulators."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from serve_apps.routing.base import EndpointState, RoutingRequest
from serve_apps.routing.fallback import FallbackCounter
from serve_apps.routing.least_busy_time import LeastBusyTimeStrategy
from serve_apps.routing.least_kv_cache import LeastKvCacheStrategy
from serve_apps.routing.least_latency import LeastLatencyStrategy
from serve_apps.routing.power_of_two import PowerOfTwoStrategy
from serve_apps.routing.session_affinity import SessionAffinityStrategy, rendezvous_pick
from serve_apps.routing.signals import EngineMetrics, GatewayStats, fresh
from serve_apps.routing.throughput import ThroughputStrategy
from serve_apps.routing.vtc_basic import VtcBasicStrategy
from serve_apps.scraper import MetricsScraper, parse_vllm_metrics
from tests.polling import eventually
from tests.simulator_fixtures import DEFAULT_MODEL

NOW = 1000.0


def endpoints(count: int, **in_flight: int) -> list[EndpointState]:
    return [EndpointState(name=f"e{i}", url=f"http://e{i}", in_flight=in_flight.get(f"e{i}", 0)) for i in range(count)]


def request(headers: dict[str, str] | None = None, **body: Any) -> RoutingRequest:
    return RoutingRequest(model="m", path="/v1/completions", body={"model": "m", **body}, headers=headers or {})


def metrics(kv: float, scraped_at: float = NOW) -> EngineMetrics:
    return EngineMetrics(scraped_at=scraped_at, num_requests_running=1, num_requests_waiting=0, kv_cache_usage=kv)


def picks(strategy: Any, req: RoutingRequest, candidates: list[EndpointState], times: int = 200) -> Counter[str]:
    return Counter(strategy.choose(req, candidates).name for _ in range(times))


# --- signals ---------------------------------------------------------------------------


def test_fresh_rejects_old_and_missing_metrics() -> None:
    assert fresh(metrics(0.5, scraped_at=NOW - 1), NOW, 2.0) is not None
    assert fresh(metrics(0.5, scraped_at=NOW - 3), NOW, 2.0) is None
    assert fresh(None, NOW, 2.0) is None


def test_gateway_stats_busy_time_tokens_and_latency() -> None:
    stats = GatewayStats(half_life_s=30.0)
    stats.record_start(NOW)
    assert stats.busy_time(NOW + 10) == pytest.approx(30 / 0.6931471805599453 * (1 - 0.5 ** (10 / 30)))
    stats.record_finish(NOW + 10, prompt_tokens=100, output_tokens=11, ttft_s=0.5, e2e_s=1.5)
    busy_at_finish = stats.busy_time(NOW + 10)
    assert stats.busy_time(NOW + 40) == pytest.approx(busy_at_finish / 2)  # idle: only decays
    assert stats.weighted_tokens(NOW + 10) == pytest.approx(122)
    assert stats.weighted_tokens(NOW + 40) == pytest.approx(61)
    assert (stats.ttft_ewma_s, stats.tpot_ewma_s, stats.latency_samples) == (0.5, pytest.approx(0.1), 1)
    assert stats.expected_latency(10) == pytest.approx(1.5)
    stats.record_start(NOW + 40)
    stats.record_finish(NOW + 41, prompt_tokens=0, output_tokens=10, ttft_s=None, e2e_s=2.0)
    assert stats.ttft_ewma_s == 0.5  # unstreamed: TTFT unknown, e2e charged per token
    assert stats.tpot_ewma_s == pytest.approx(0.1 + 0.2 * (0.2 - 0.1))


# --- strategies --------------------------------------------------------------------------


def test_power_of_two_prefers_fewer_in_flight_of_two_distinct() -> None:
    strategy = PowerOfTwoStrategy(rng=random.Random(1))
    candidates = endpoints(3, e0=5, e1=0, e2=5)
    counts = picks(strategy, request(), candidates, 300)
    # e1 wins whenever drawn (2 of 3 pairs); the busiest never wins against it.
    assert counts["e1"] == pytest.approx(200, abs=40)
    assert picks(strategy, request(), endpoints(1))["e0"] == 200
    # Never the same endpoint twice: with a busy and an idle one the idle always wins.
    assert picks(strategy, request(), endpoints(2, e0=3)) == Counter({"e1": 200})


def test_least_kv_cache_picks_lowest_fresh_usage_ties_uniform() -> None:
    counter = FallbackCounter()
    strategy = LeastKvCacheStrategy(rng=random.Random(2), clock=lambda: NOW, fallbacks=counter)
    candidates = endpoints(3)
    for endpoint, kv in zip(candidates, (0.4, 0.1, 0.1)):
        endpoint.engine_metrics = metrics(kv)
    counts = picks(strategy, request(), candidates)
    assert set(counts) == {"e1", "e2"} and min(counts.values()) > 60
    assert counter.snapshot() == {}


def test_least_kv_cache_spreads_a_burst_between_scrapes_even_from_two_replicas() -> None:
    """Between two scrapes the usage is projected from this replica's own sends, so a
    burst fills endpoints in proportion to their headroom instead of all landing on the
    one that looked emptiest; two replicas reading the same scrape each do so."""
    replicas = []
    for seed in (4, 5):
        candidates = endpoints(4)
        for endpoint, kv in zip(candidates, (0.10, 0.12, 0.30, 0.50)):
            endpoint.on_scrape(EngineMetrics(NOW, num_requests_running=10, num_requests_waiting=0, kv_cache_usage=kv))
        replicas.append((LeastKvCacheStrategy(rng=random.Random(seed), clock=lambda: NOW), candidates))
    burst: Counter[str] = Counter()
    for _ in range(12):
        for strategy, candidates in replicas:
            chosen = strategy.choose(request(), candidates)
            chosen.on_dispatch(NOW)
            burst[chosen.name] += 1
    # Each send adds a tenth of the endpoint's usage (10 running): e0 and e1 level out and
    # share the burst; e2 and e3 stay well above them. Without projection e0 would take all 24.
    assert set(burst) == {"e0", "e1"} and min(burst.values()) >= 8
    candidates[0].on_scrape(metrics(0.2))
    assert candidates[0].dispatched_since_scrape == 0


@pytest.mark.parametrize(
    ("scrape", "reason"), [(None, "no-metrics"), (metrics(0.0, scraped_at=NOW - 5), "stale-metrics")]
)
def test_least_kv_cache_falls_back_to_least_request_and_counts(scrape: EngineMetrics | None, reason: str) -> None:
    counter = FallbackCounter()
    strategy = LeastKvCacheStrategy(rng=random.Random(3), clock=lambda: NOW, fallbacks=counter)
    candidates = endpoints(3, e0=2, e1=2, e2=1)
    candidates[0].engine_metrics, candidates[1].engine_metrics = metrics(0.9), metrics(0.8)
    candidates[2].engine_metrics = scrape
    assert picks(strategy, request(), candidates, 10) == Counter({"e2": 10})  # fewest in flight
    assert counter.get("least-kv-cache", reason) == 10


def test_least_busy_time_prefers_the_endpoint_busy_for_less_time() -> None:
    candidates = endpoints(3)
    for endpoint, busy_for in zip(candidates, (20.0, 5.0, 5.0)):
        endpoint.stats.record_start(NOW - 30)
        endpoint.stats.record_finish(NOW - 30 + busy_for, 0, 0, None, busy_for)
    strategy = LeastBusyTimeStrategy(rng=random.Random(4), clock=lambda: NOW)
    assert set(picks(strategy, request(), candidates)) == {"e1", "e2"}
    candidates[1].stats.record_start(NOW - 1)  # e1 is busy again, so accrues busy time
    assert picks(strategy, request(), candidates, 20) == Counter({"e2": 20})


def test_throughput_prefers_the_endpoint_with_fewer_recent_weighted_tokens() -> None:
    candidates = endpoints(2)
    # e0: 1000 prompt tokens; e1: 300 prompt + 400 output = 1100 weighted, so e0 did less.
    for endpoint, (prompt, output) in zip(candidates, ((1000, 0), (300, 400))):
        endpoint.stats.record_start(NOW - 1)
        endpoint.stats.record_finish(NOW, prompt, output, 0.1, 1.0)
    strategy = ThroughputStrategy(rng=random.Random(5), clock=lambda: NOW)
    assert picks(strategy, request(), candidates, 20) == Counter({"e0": 20})


def test_least_latency_tries_idle_cold_endpoints_then_ranks_by_expected_latency() -> None:
    counter = FallbackCounter()
    strategy = LeastLatencyStrategy(rng=random.Random(6), default_output_tokens=100, fallbacks=counter)
    fast_prefill, fast_decode, cold = endpoints(3)
    fast_prefill.stats.record_finish(NOW, 10, 101, ttft_s=0.1, e2e_s=5.1)  # 0.1 + 0.05 x n
    fast_decode.stats.record_finish(NOW, 10, 101, ttft_s=1.0, e2e_s=3.0)  # 1.0 + 0.02 x n
    candidates = [fast_prefill, fast_decode, cold]
    assert strategy.choose(request(), candidates) is cold
    cold.in_flight = 1  # its probe is out: rank the warm ones
    assert strategy.choose(request(max_tokens=10), candidates) is fast_prefill  # 0.6 s vs 1.2 s
    assert strategy.choose(request(max_tokens=1000), candidates) is fast_decode  # 50.1 s vs 21 s
    assert strategy.choose(request(), candidates) is fast_decode  # default 100: 5.1 s vs 3 s
    assert counter.snapshot() == {}
    all_cold = endpoints(2, e0=1, e1=0)
    all_cold[1].in_flight = 2
    assert strategy.choose(request(), all_cold).name == "e0"
    assert counter.get("least-latency", "no-latency-samples") == 1


def test_session_affinity_is_sticky_agrees_across_replicas_and_falls_back() -> None:
    counter = FallbackCounter()
    first, second = (SessionAffinityStrategy(rng=random.Random(seed), fallbacks=counter) for seed in (7, 8))
    candidates = endpoints(4)
    sessions = [f"session-{i}" for i in range(40)]
    placed = {s: first.choose(request({"x-session-id": s}), candidates).name for s in sessions}
    assert len(set(placed.values())) > 1  # spread over endpoints
    assert all(second.choose(request({"x-session-id": s}), candidates).name == placed[s] for s in sessions)
    candidates[2].in_flight = 9  # load does not move a session
    assert all(first.choose(request({"x-session-id": s}), candidates).name == placed[s] for s in sessions)
    # Adding an endpoint keeps remembered sessions where they are; removing one moves only its own.
    grown = [*candidates, EndpointState(name="e4", url="http://e4")]
    assert all(first.choose(request({"x-session-id": s}), grown).name == placed[s] for s in sessions)
    shrunk = [c for c in candidates if c.name != "e0"]
    moved = {s for s in sessions if first.choose(request({"x-session-id": s}), shrunk).name != placed[s]}
    assert moved == {s for s in sessions if placed[s] == "e0"}
    assert all(rendezvous_pick(s, shrunk).name != "e0" for s in moved)
    assert first.choose(request(), endpoints(2, e0=1)).name == "e1"
    assert counter.get("session-affinity", "no-session-header") == 1


def test_vtc_counters_lift_idle_users_to_the_active_minimum() -> None:
    vtc = VtcBasicStrategy(rng=random.Random(9), fallbacks=FallbackCounter())
    vtc.record_start("heavy")
    vtc.record_served("heavy", 1000, 500)  # 2000
    vtc.record_start("heavy")
    vtc.record_start("light")  # heavy is active at 2000: light is lifted to it
    assert vtc.counter("light") == 2000
    vtc.record_served("light", 10, 0)
    vtc.record_served("heavy", 0, 0)
    vtc.record_start("newcomer")  # nobody active: lifted to the last user to go idle
    assert vtc.counter("newcomer") == 2000


def test_vtc_steers_heavy_users_to_busy_endpoints_and_light_users_to_idle_ones() -> None:
    counter = FallbackCounter()
    vtc = VtcBasicStrategy(rng=random.Random(10), fallbacks=counter)
    served = {"heavy": 10_000, "medium": 5_000, "light": 0}
    for user in served:  # two requests each, so every user stays active after one finishes
        vtc.record_start(user)
        vtc.record_start(user)
    for user, tokens in served.items():
        vtc.record_served(user, tokens, 0)
    candidates = endpoints(3, e0=4, e1=0, e2=2)
    assert vtc.choose(request({"user": "heavy"}), candidates).name == "e0"
    assert vtc.choose(request(user="light"), candidates).name == "e1"  # body field works too
    assert vtc.choose(request({"user": "medium"}), candidates).name == "e2"
    assert vtc.choose(request(), candidates).name == "e1"
    assert counter.get("vtc-basic", "no-user") == 1


# --- metrics parsing and scraping against real simulators -----------------------------------


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.read().decode()


def test_parse_vllm_metrics_on_simulator_output(simulator: Any) -> None:
    text = fetch_metrics(simulator.url)
    parsed = parse_vllm_metrics(text, DEFAULT_MODEL, scraped_at=NOW)
    assert parsed == EngineMetrics(scraped_at=NOW, num_requests_running=0, num_requests_waiting=0, kv_cache_usage=0)
    assert parse_vllm_metrics(text, "another-model", NOW) is None
    # Older engines: only the deprecated name, two data-parallel engines.
    old = "\n".join(
        line.replace('engine="0"', f'engine="{engine}"').replace("0.0", value)
        for engine, value in (("0", "0.2"), ("1", "0.4"))
        for line in text.splitlines()
        if line.startswith(("vllm:num_requests_running{", "vllm:gpu_cache_usage_perc{"))
    ) + "\nvllm:num_requests_waiting 3\n"
    parsed_old = parse_vllm_metrics(old, None, NOW)
    assert parsed_old is not None
    assert parsed_old.kv_cache_usage == pytest.approx(0.3)
    assert (parsed_old.num_requests_running, parsed_old.num_requests_waiting) == (pytest.approx(0.6), 3)


def requests_at(url: str) -> float:
    reported = parse_vllm_metrics(fetch_metrics(url), DEFAULT_MODEL, NOW)
    assert reported is not None
    return reported.num_requests_running + reported.num_requests_waiting


def send_long_request(url: str) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "hello " * 2000, "max_tokens": 400, "ignore_eos": True}
    data = json.dumps(body).encode()
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/v1/completions", data=data, headers={"content-type": "application/json"}),
            timeout=60,
        ).read()
    except (urllib.error.URLError, ConnectionError):
        pass  # the simulator is stopped under it at teardown


def test_scraper_orders_endpoints_by_kv_usage_like_their_metrics(simulator_factory: Any) -> None:
    loaded, idle = (simulator_factory("--gpu", "h100", "--time-scale", "20") for _ in range(2))
    for _ in range(2):
        threading.Thread(target=send_long_request, args=(loaded.url,), daemon=True).start()
    eventually(lambda: requests_at(loaded.url) == 2, "both long requests to run on the loaded engine", 20)
    states = [EndpointState(name="loaded", url=loaded.url), EndpointState(name="idle", url=idle.url)]

    async def scrape_until_both_seen() -> None:
        scraper = MetricsScraper(lambda: states, interval_s=0.2, timeout_s=5)
        scraper.start()
        while any(s.engine_metrics is None for s in states):
            await asyncio.sleep(0.05)
        await scraper.stop()

    asyncio.run(asyncio.wait_for(scrape_until_both_seen(), 20))
    truth = {s.name: parse_vllm_metrics(fetch_metrics(s.url), DEFAULT_MODEL, NOW) for s in states}
    scraped = {s.name: s.engine_metrics for s in states}
    assert scraped["loaded"].kv_cache_usage > scraped["idle"].kv_cache_usage == 0
    assert truth["loaded"].kv_cache_usage > truth["idle"].kv_cache_usage == 0
    assert scraped["loaded"].num_requests_running + scraped["loaded"].num_requests_waiting == 2
