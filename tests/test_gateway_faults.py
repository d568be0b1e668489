"""Faults the gateway must survive: an engine that dies, and a client that leaves mid-stream."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import pytest
import ray

from serve_apps.registry import get_registry
from tests.conftest import MODEL, deploy_app, pool_config
from tests.polling import eventually
from tests.test_gateway import post

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(gateway_port: int) -> str:
    return deploy_app(pool_config(replicas=2, gpu="h100", time_scale=1.0), gateway_port, expected_ready=2)


def engines() -> dict[str, object]:
    return {e.name: e for e in ray.get(get_registry().snapshot.remote()).endpoints if e.model == MODEL}


def gauge(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def test_dead_engine_is_routed_around_then_restarted(gateway: str) -> None:
    victim = sorted(engines().values(), key=lambda e: e.name)[0]
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(urllib.request.Request(f"{victim.url}/sim/crash", data=b"{}"), timeout=5)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    # Whatever the registry believes right now, no request fails or hangs: a refused
    # connection is retried once on the other engine.
    for strategy in ("random", "least-request") * 10:
        status, headers, payload = post(f"{gateway}/v1/chat/completions", body, {"routing-strategy": strategy})
        assert status == 200, payload
        assert headers["target-pod"] != victim.name
    # The engine pool notices and starts the engine again, on the same URL.
    eventually(lambda: engines()[victim.name].ready, "the crashed engine to come back", 60)
    eventually(lambda: _served_by(gateway, body, victim.name), "traffic to reach the restarted engine", 30)


def _served_by(gateway: str, body: bytes, name: str) -> bool:
    status, headers, _ = post(f"{gateway}/v1/chat/completions", body, {"routing-strategy": "random"})
    return status == 200 and headers["target-pod"] == name


def test_client_leaving_mid_stream_aborts_the_engine_request(gateway: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long story please"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    payload = json.dumps(body).encode()
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        first = sock.recv(65536)
        assert b"200 OK" in first
        target = re.search(rb"target-pod: (\S+)", first).group(1).decode()
    url = engines()[target].url
    # 2,000 tokens at ~7 ms each would run for 14 s; the abort must end it long before.
    eventually(lambda: gauge(url, "vllm:num_requests_running") == 0, "the engine to drop the request", 10)
