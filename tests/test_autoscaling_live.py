"""KPA scaling a live engine pool: real Ray, Serve, gateway and simulator processes.

A burst of streams drives the gateway's in-flight count far above the target: KPA panics
and scales up within its panic window. When the burst ends, two long streams are still
running; KPA waits out the stable window and the scale-down delay, then removes engines,
which drain first, so both streams finish whole. The ``rayfleet up --autoscale`` flags are
checked separately for the config they produce.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import aiohttp
import openai
import pytest

from rayfleet.stack import UpOptions, UsageError, build_config
from tests.conftest import MODEL, deploy_app, pool_config
from tests.polling import eventually

pytestmark = pytest.mark.timeout(400)

KNOBS = {"stable-window": "6s", "panic-window": "2s", "scale-down-delay": "4s", "sync-period": "1s"}


def autoscaled_config(replicas: int = 1, min_replicas: int = 1, max_replicas: int = 3, **knobs: str) -> dict:
    config = pool_config(replicas=replicas, gpu="h100", time_scale=1.0)
    config["models"][0]["autoscaling"] = {
        "strategy": "KPA", "min_replicas": min_replicas, "max_replicas": max_replicas,
        "metrics": [{"metricSourceType": "gateway", "targetMetric": "in_flight", "targetValue": 2}],
        "annotations": {f"autoscaling.rayfleet.io/{k}": v for k, v in {**KNOBS, **knobs}.items()},
    }  # fmt: skip
    return config


def status() -> dict:
    import ray

    from serve_apps.autoscalers import autoscaler_actor_name

    return ray.get(ray.get_actor(autoscaler_actor_name(MODEL)).status.remote(), timeout=10)


async def stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    """One streamed completion; the number of content events it delivered."""
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    events = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {"):
                events += json.loads(line[6:])["choices"][0]["text"] != ""
    return events


def test_kpa_scales_up_in_a_burst_and_down_after_the_delay_without_losing_a_request(gateway_port: int) -> None:
    url = deploy_app(autoscaled_config(), gateway_port, expected_ready=1)
    timeline: list[tuple[float, dict]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            timeline.append((time.monotonic(), status()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)

    async def load() -> tuple[list[int], list[int], float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            started = time.monotonic()

            async def burst_loop() -> list[int]:
                counts = []
                while time.monotonic() - started < 10:
                    counts.append(await stream(session, url, 128))
                return counts

            async def long_stream() -> int:
                await asyncio.sleep(7)  # after the scale-up: it may land on a new engine
                return await stream(session, url, 2500)

            bursts, longs = await asyncio.gather(
                asyncio.gather(*(burst_loop() for _ in range(12))), asyncio.gather(*(long_stream() for _ in range(2)))
            )
            return [n for counts in bursts for n in counts], list(longs), started

    watcher.start()
    try:
        burst_counts, long_counts, started = asyncio.run(load())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (status()["current"] == 1 and status()["ready"] == 1):
            time.sleep(1)
    finally:
        done.set()
        watcher.join()
    assert burst_counts and all(n == 128 for n in burst_counts)  # every burst request answered in full
    assert long_counts == [2500, 2500]  # the streams running through the scale-down finished whole
    peak = next((at for at, s in timeline if s["current"] == 3), None)
    assert peak is not None and peak - started < 10, timeline[-1]  # while the 10 s burst was still on
    final = status()
    assert (final["current"], final["ready"]) == (1, 1), final
    downs = [at for (at, s), (_, before) in zip(timeline[1:], timeline) if s["current"] < before["current"]]
    assert downs and downs[0] - started > 10 + 4, "scaled down before the burst's stable window and delay passed"


def test_kpa_scales_a_pool_from_zero_for_a_waiting_request_and_back_to_zero(gateway_port: int) -> None:
    """Knative's activator path: with no engine, the gateway holds the request and reports
    it; KPA starts an engine; the request is answered; idle again, the pool goes to zero."""
    url = deploy_app(autoscaled_config(replicas=0, min_replicas=0, max_replicas=2, **{"scale-down-delay": "0s"}),
                     gateway_port, expected_ready=0)  # fmt: skip
    eventually(lambda: (status()["current"], status()["ready"]) == (0, 0), "the pool at zero", 30)
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        assert MODEL in [card["id"] for card in json.loads(response.read())["data"]]  # listed while at zero

    llm = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = llm.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "wake up"}], max_tokens=8
    )
    assert reply.parse().choices[0].message.content and reply.headers["target-pod"]
    woke = status()
    assert woke["current"] >= 1 and woke["scale_events"] >= 1, woke

    eventually(lambda: (status()["current"], status()["ready"]) == (0, 0), "the idle pool back at zero", 90)
    again = llm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=4)
    assert again.choices[0].message.content  # a second activation works the same way


def test_rayfleet_up_autoscale_flags_build_the_autoscaler() -> None:
    config = build_config(UpOptions(autoscale="kpa", min_replicas=1, max_replicas=4, engines=6,
                                    autoscale_options=("stable-window=30s", "autoscaling.aibrix.ai/panic-threshold=3")))  # fmt: skip
    model = config["models"][0]
    assert model["pool"]["replicas"] == 4  # the starting size is brought inside [min, max]
    assert model["autoscaling"]["strategy"] == "KPA"
    assert model["autoscaling"]["annotations"] == {
        "autoscaling.rayfleet.io/stable-window": "30s", "autoscaling.aibrix.ai/panic-threshold": "3"}  # fmt: skip
    with pytest.raises(UsageError, match="takes KNOB=VALUE"):
        build_config(UpOptions(autoscale="kpa", autoscale_options=("stable-window",)))
    with pytest.raises(UsageError, match="no knob 'warp-speed'"):
        build_config(UpOptions(autoscale="hpa", autoscale_options=("warp-speed=9",)))
