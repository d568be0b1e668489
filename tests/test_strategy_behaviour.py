"""Every routing strategy's defining behaviour, shown live: real Ray cluster, Serve app, and
three simulated engines, driven over HTTP through the gateway.

The unit tests (test_signal_routing.py, test_prefix_routing.py) drive strategies with
hand-made state; these check that the live signals (the gateway's in-flight counts, its
latency and work measurements, scraped engine metrics, the prefix index, the users' token
counters) really reach the strategies and make them route as their docstrings say.

Load is built with streams held open: ``Streams.open`` returns once the gateway has sent
the response headers (the request is counted in flight), and closing the connection makes
the gateway abort it on the engine. Streams meant for one endpoint are routed there by
``session-affinity`` with a session id chosen by the same rendezvous hash the gateway uses.

The app is deployed once. The gateway's decayed work signals (throughput, busy time) keep
the module's whole history, so the test reading them runs first, when that history is
short; least-latency re-warms every endpoint itself. The engine crash is last.
"""

from __future__ import annotations

import collections
import functools
import http.client
import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from engines.core.tokenizer import get_tokenizer
from serve_apps.routing import EndpointState
from serve_apps.routing._prefix_common import ImbalanceBound
from serve_apps.routing.prompt_blocks import DEFAULT_BLOCK_SIZE, render_prompt
from serve_apps.routing.session_affinity import SESSION_HEADER, rendezvous_pick
from serve_apps.scraper import DEFAULT_INTERVAL_S as SCRAPE_INTERVAL_S
from tests.conftest import MODEL, deploy_app, pool_config
from tests.test_engine_core import tokens
from tests.test_gateway import post
from tests.polling import eventually
from tests.test_gateway_faults import engines, gauge

pytestmark = pytest.mark.timeout(300)

REPLICAS = 3
# h100 step times x10: a decode step takes ~65 ms, so a held stream yields ~15 chunks/s
# (cheap to relay on 2 cores) and a 1-token probe takes ~0.1 s.
TIME_SCALE = 10.0
# A small KV cache (~41k tokens per engine) so that a few long prompts fill a large share.
GPU_MEMORY_UTILIZATION = 0.3
MODEL_DEFAULT_STRATEGY = "session-affinity"
LONG_STREAM_TOKENS = 2000  # far longer than any test: held streams end when closed


@pytest.fixture(scope="module")
def gateway(gateway_port: int) -> str:
    config = pool_config(replicas=REPLICAS, gpu="h100", time_scale=TIME_SCALE)
    model = config["models"][0]
    model["default_strategy"] = MODEL_DEFAULT_STRATEGY
    model["pool"]["engine_config"]["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    return deploy_app(config, gateway_port, expected_ready=REPLICAS)


@pytest.fixture(scope="module")
def pods(gateway: str) -> list[str]:
    return sorted(engines())


@pytest.fixture(scope="module")
def engine_urls(gateway: str) -> dict[str, str]:
    """Engine URLs by endpoint name; they survive an engine restart (same port)."""
    return {name: endpoint.url for name, endpoint in engines().items()}


def fleet_idle(engine_urls: dict[str, str]) -> bool:
    return all(
        gauge(url, "vllm:num_requests_running") + gauge(url, "vllm:num_requests_waiting") == 0
        for url in engine_urls.values()
    )


@pytest.fixture(autouse=True)
def idle_fleet(engine_urls: dict[str, str]) -> None:
    """Each test starts with no request anywhere, so the load it builds is all there is."""
    eventually(lambda: fleet_idle(engine_urls), "the engines to finish earlier requests", 30)


class Streams:
    """Streaming requests held open (unread) until ``close_all``."""

    def __init__(self) -> None:
        self._connections: list[http.client.HTTPConnection] = []

    def open(self, base_url: str, body: dict, headers: dict[str, str] | None = None) -> str | None:
        """Start a stream and return once its headers arrived; the ``target-pod`` it names, if any."""
        address = urlsplit(base_url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        self._connections.append(connection)
        payload = json.dumps({**body, "stream": True, "max_tokens": LONG_STREAM_TOKENS, "ignore_eos": True})
        connection.request(
            "POST", "/v1/chat/completions", payload, {"content-type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return response.getheader("target-pod")

    def close_all(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()


@pytest.fixture
def streams(engine_urls: dict[str, str]) -> Iterator[Streams]:
    held = Streams()
    yield held
    held.close_all()
    eventually(lambda: fleet_idle(engine_urls), "the engines to abort the closed streams", 30)


def words(count: int, seed: int) -> str:
    """Text of exactly ``count`` tokens; different seeds share no prefix."""
    return get_tokenizer().decode(tokens(count, seed))


def chat(user: str, system: str | None = None, max_tokens: int = 1) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}


def route(gateway: str, body: dict, headers: dict[str, str]) -> str:
    """Send one request through the gateway and return the endpoint that served it."""
    status, response_headers, payload = post(f"{gateway}/v1/chat/completions", json.dumps(body).encode(), headers)
    assert status == 200, payload
    return response_headers["target-pod"]


def probe(gateway: str, strategy: str, count: int) -> collections.Counter:
    """Short requests one after another; how many each endpoint got."""
    headers = {"routing-strategy": strategy}
    return collections.Counter(route(gateway, chat(f"probe {i}"), headers) for i in range(count))


def placement(session: str, pods: list[str]) -> str:
    """Where session-affinity places a new session while all ``pods`` are ready."""
    return rendezvous_pick(session, [EndpointState(name=name, url="") for name in pods]).name


def session_on(pod: str, pods: list[str], tag: str) -> str:
    """A session id that session-affinity places on ``pod``."""
    return next(s for s in (f"{tag}-{i}" for i in itertools.count()) if placement(s, pods) == pod)


def pin(pod: str, pods: list[str], tag: str) -> dict[str, str]:
    """Headers that route a request to ``pod`` (through the gateway, so it is counted there)."""
    return {"routing-strategy": "session-affinity", SESSION_HEADER: session_on(pod, pods, tag)}


def load(streams: Streams, gateway: str, pod: str, pods: list[str], count: int, tag: str) -> None:
    """Hold ``count`` streams on ``pod``, counted in the gateway's in-flight numbers."""
    headers = pin(pod, pods, tag)
    for i in range(count):
        assert streams.open(gateway, chat(f"{tag} stream {i}"), headers) == pod


def concurrently(calls: list[Callable[[], object]]) -> list[object]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


@pytest.mark.parametrize("strategy", ["throughput", "least-busy-time"])
def test_endpoint_that_did_the_work_is_avoided(gateway: str, pods: list[str], strategy: str) -> None:
    """After an endpoint processed many tokens for a few seconds, new requests go elsewhere,
    although nothing is in flight anywhere (least-request would still pick it a third of the time).
    """
    worker = probe(gateway, strategy, 1).most_common(1)[0][0]  # the strategy's current favourite
    headers = pin(worker, pods, f"work-{strategy}")
    work = chat(words(1000, seed=1), max_tokens=60)  # ~4 s and ~4.5k weighted tokens
    assert concurrently([functools.partial(route, gateway, work, headers)] * 4) == [worker] * 4
    counts = probe(gateway, strategy, 16)
    assert counts[worker] == 0, counts


def test_least_request_and_power_of_two_avoid_loaded_endpoints(gateway: str, pods: list[str], streams: Streams) -> None:
    """In-flight loads 4 / 2 / 0: least-request always picks the idle endpoint. Power-of-two
    compares two distinct random endpoints, so it never picks the busiest of three but picks
    the middle one whenever it draws it against the busiest (a third of the time).
    """
    busiest, middle, idle = pods
    load(streams, gateway, busiest, pods, 4, "busiest")
    load(streams, gateway, middle, pods, 2, "middle")
    assert probe(gateway, "least-request", 20) == {idle: 20}
    counts = probe(gateway, "power-of-two", 30)
    assert counts[busiest] == 0, counts
    assert counts[middle] >= 1 and counts[idle] >= 1, counts


def test_least_kv_cache_avoids_endpoint_loaded_behind_the_gateways_back(
    gateway: str, pods: list[str], engine_urls: dict[str, str], streams: Streams
) -> None:
    """Long prompts sent to one engine directly fill its KV cache; the gateway's in-flight
    counts do not see them, its scrapes of ``/metrics`` do.
    """
    full = pods[0]
    for i in range(2):
        streams.open(engine_urls[full], chat(words(5000, seed=100 + i)))
    eventually(lambda: gauge(engine_urls[full], "vllm:kv_cache_usage_perc") > 0.15, "the KV cache to fill", 30)
    time.sleep(2 * SCRAPE_INTERVAL_S)  # at least one scrape since
    counts = probe(gateway, "least-kv-cache", 20)
    assert counts[full] == 0, counts
    assert len(counts) == REPLICAS - 1, counts
    # The contrast: by in-flight counts the full engine is idle.
    assert probe(gateway, "least-request", 24)[full] >= 1


def set_added_latency(engine_url: str, seconds: float) -> None:
    """The simulator's fault knob: every request waits ``seconds`` before the engine sees it."""
    status, _, payload = post(f"{engine_url}/sim/faults", json.dumps({"added_latency_s": seconds}).encode())
    assert status == 200, payload


def test_least_latency_prefers_fast_endpoints(gateway: str, pods: list[str], engine_urls: dict[str, str]) -> None:
    """An engine that answers 1 s later than the others stops getting requests once the
    gateway has measured every endpoint.
    """
    slow = pods[0]
    set_added_latency(engine_urls[slow], 1.0)
    try:
        # Fresh latency samples of every endpoint (the EWMAs remember earlier tests).
        body = {**chat("warm up", max_tokens=4), "stream": True}
        calls = [functools.partial(route, gateway, body, pin(pod, pods, f"warm-{pod}")) for pod in pods] * 6
        assert collections.Counter(concurrently(calls)) == {pod: 6 for pod in pods}
        least_latency = {"routing-strategy": "least-latency"}
        counts = collections.Counter(
            route(gateway, {**chat(f"fast {i}", max_tokens=4), "stream": True}, least_latency) for i in range(15)
        )
        assert counts[slow] == 0, counts
    finally:
        set_added_latency(engine_urls[slow], 0.0)


def cached_prefix_tokens(first: dict, second: dict) -> int:
    """Prompt tokens of ``second`` that the engine finds cached after serving ``first``."""
    a, b = (render_prompt(body, get_tokenizer()) for body in (first, second))
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return common // DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE


def test_prefix_cache_keeps_a_shared_prompt_together_until_overloaded(
    gateway: str, engine_urls: dict[str, str], streams: Streams
) -> None:
    """Requests sharing a 10-block system prompt all go where it is cached, and the engine
    there reports the hits; held concurrently, they stay until that endpoint is overloaded.
    """
    system = words(10 * DEFAULT_BLOCK_SIZE, seed=200)
    bodies = [chat(words(20, seed=300 + i), system=system) for i in range(8)]
    hits_before = {pod: gauge(url, "vllm:prefix_cache_hits_total") for pod, url in engine_urls.items()}
    served = [route(gateway, body, {"routing-strategy": "prefix-cache"}) for body in bodies]
    holder = served[0]
    assert served == [holder] * len(bodies)
    hits = gauge(engine_urls[holder], "vllm:prefix_cache_hits_total") - hits_before[holder]
    assert hits >= (len(bodies) - 1) * cached_prefix_tokens(bodies[0], bodies[1]) > 0

    # Under load the holder keeps the prompt until it exceeds the imbalance bound; the gateway
    # builds the strategy with the default bound (with the others idle: min + absolute).
    bound = ImbalanceBound().absolute
    served = [
        streams.open(gateway, chat(words(20, seed=400 + i), system=system), {"routing-strategy": "prefix-cache"})
        for i in range(bound + 4)
    ]
    assert served[: bound + 1] == [holder] * (bound + 1), served
    assert holder not in served[bound + 1 :], served


def test_prefix_cache_and_load_trades_cache_hits_against_queueing(gateway: str, streams: Streams) -> None:
    """A cached prefix of ~600 tokens (under half the prompt) is worth about one queued
    request (512 prefill tokens): alone, requests stay with the cache; held concurrently, they
    spread over every endpoint long before prefix-cache's imbalance bound would let them.
    """
    system = words(600, seed=500)
    headers = {"routing-strategy": "prefix-cache-and-load"}
    served = [route(gateway, chat(words(800, seed=600 + i), system=system), headers) for i in range(4)]
    assert served == [served[0]] * 4
    held = collections.Counter(
        streams.open(gateway, chat(words(800, seed=700 + i), system=system), headers) for i in range(6)
    )
    assert len(held) == REPLICAS and max(held.values()) <= 3, held


def test_vtc_basic_sends_the_heavy_user_to_busy_endpoints(gateway: str, pods: list[str], streams: Streams) -> None:
    """Two active users: the one served more tokens gets the busiest endpoint, the other the
    least loaded (least-request would give both the least loaded).
    """
    heavy, light = {"user": "heavy-user"}, {"user": "light-user"}
    vtc = {"routing-strategy": "vtc-basic"}
    # Both users stay active (a request in flight) for the whole test.
    light_pod = streams.open(gateway, chat("light keeps a stream"), {**vtc, **light})
    heavy_pod = streams.open(gateway, chat("heavy keeps a stream"), {**vtc, **heavy})
    work = chat(words(800, seed=800), max_tokens=5)
    concurrently([functools.partial(route, gateway, work, {**vtc, **heavy})] * 4)  # ~3.2k tokens served to heavy
    # In-flight loads: 3 on heavy's endpoint, 1 on light's, 0 on the third.
    load(streams, gateway, heavy_pod, pods, 2, "vtc-load")
    (idle,) = set(pods) - {heavy_pod, light_pod}
    for i in range(8):
        assert route(gateway, chat(f"heavy {i}"), {**vtc, **heavy}) == heavy_pod
        assert route(gateway, chat(f"light {i}"), {**vtc, **light}) == idle


def test_model_default_strategy_applies_without_header(gateway: str, pods: list[str]) -> None:
    """The model's configured default (session-affinity) routes requests that name no strategy."""
    for session in ("default-a", "default-b", "default-c"):
        for i in range(4):
            status, headers, payload = post(
                f"{gateway}/v1/chat/completions", json.dumps(chat(f"no header {i}")).encode(), {SESSION_HEADER: session}
            )
            assert status == 200, payload
            assert headers["routing-strategy"] == MODEL_DEFAULT_STRATEGY
            assert headers["target-pod"] == placement(session, pods)


def test_session_affinity_sticks_and_moves_only_when_its_endpoint_leaves(
    gateway: str, pods: list[str], engine_urls: dict[str, str]
) -> None:
    """Sessions are placed by rendezvous hashing and stay put; when an endpoint dies its
    sessions move, and stay on their new endpoint after the old one comes back.
    """
    affinity = {"routing-strategy": "session-affinity"}
    sessions = [f"spread-{i}" for i in range(24)]
    placed = {s: route(gateway, chat("hi"), {**affinity, SESSION_HEADER: s}) for s in sessions}
    assert placed == {session: placement(session, pods) for session in sessions}
    assert len(set(placed.values())) == REPLICAS

    sticky = {**affinity, SESSION_HEADER: "sticky"}
    first = route(gateway, chat("turn 0"), sticky)
    assert [route(gateway, chat(f"turn {i}"), sticky) for i in range(1, 10)] == [first] * 9

    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(urllib.request.Request(f"{engine_urls[first]}/sim/crash", data=b"{}"), timeout=5)
    moved = [route(gateway, chat(f"after crash {i}"), sticky) for i in range(10)]
    assert first not in moved and len(set(moved)) == 1, moved

    # The engine pool restarts the engine on the same URL; once it serves again it is a
    # candidate again, but the session stays where it moved.
    eventually(lambda: route(gateway, chat("anyone"), {"routing-strategy": "random"}) == first, "the restart", 60)
    assert [route(gateway, chat(f"back {i}"), sticky) for i in range(10)] == moved[:1] * 10
