"""Prefix routing on the engines' own KV events, live: two simulated engines publish
their cache's events, subscribers feed the sharded index on Ray actors, and the gateway's
prefix strategy consults it.

What an approximate index (the gateway's own routing history) cannot do, and this must:
forget a prefix the engine evicted, and say so for blocks stored behind the gateway's back.
And the index must survive a shard actor being killed while routing stays correct.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest
import ray

from kvcache.client import KVIndexClient, ensure_index
from kvcache.hashing import BlockHasher
from serve_apps.routing import RoutingRequest
from serve_apps.routing.prompt_blocks import block_hashes
from tests.conftest import MODEL, deploy_app, pool_config
from tests.test_gateway import post
from tests.polling import eventually
from tests.test_gateway_faults import engines
from tests.test_strategy_behaviour import words

pytestmark = pytest.mark.timeout(300)

NUM_GPU_BLOCKS = 96  # 1,536 tokens per engine: two 40-block prompts fill it
SHARDS = 2


@pytest.fixture(scope="module")
def gateway(gateway_port: int) -> str:
    config = pool_config(replicas=2, gpu="instant")
    model = config["models"][0]
    model["prefix_index"] = "events"
    model["pool"]["engine_config"]["num_gpu_blocks_override"] = NUM_GPU_BLOCKS
    # A generous budget: on a loaded 2-core CI box a Ray call can take tens of ms, and a
    # miss would route on the approximate index, which is not what this module tests.
    config["gateway"].update(default_strategy="prefix-cache", kv_index={"num_shards": SHARDS, "lookup_budget_s": 1.0})
    return deploy_app(config, gateway_port, expected_ready=2)


def body(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 1}


def send(url: str, prompt: str) -> str:
    """POST a completion; the endpoint the gateway chose (empty when sent to an engine)."""
    status, headers, payload = post(f"{url}/v1/completions", json.dumps(body(prompt)).encode())
    assert status == 200, payload
    return headers.get("target-pod", "")


def indexed(prompt: str) -> dict[str, int]:
    """Per endpoint, the prompt's leading blocks the shared index says it holds."""
    hashes = block_hashes(RoutingRequest(MODEL, "/v1/completions", body(prompt)), BlockHasher())
    client = KVIndexClient(ensure_index(SHARDS, 2_500_000))
    result = asyncio.run(client.lookup(hashes, sorted(engines()), 5.0))
    assert result is not None, "the index did not answer within 5 s"
    return result


@pytest.fixture(autouse=True)
def empty_caches(gateway: str) -> None:
    for engine in engines().values():
        urllib.request.urlopen(urllib.request.Request(f"{engine.url}/reset_prefix_cache", data=b""), timeout=5)


def test_the_index_follows_eviction_and_direct_traffic(gateway: str) -> None:
    prompt = words(600, seed=1)  # ~38 blocks
    first = send(gateway, prompt)
    eventually(lambda: indexed(prompt).get(first, 0) >= 30, "the index to learn the first placement", 30)
    assert send(gateway, prompt) == first  # it holds the prefix: routed back there
    (other,) = set(engines()) - {first}

    # Fill the first engine's cache straight from the side: the gateway never sees this
    # traffic, only the engine's BlockRemoved events tell the index the prefix is gone.
    for seed in (2, 3, 4):
        send(engines()[first].url, words(600, seed=seed))
    eventually(lambda: indexed(prompt).get(first, 1) == 0, "the index to forget the evicted prefix", 30)

    # And blocks stored behind the gateway's back are found: the other engine now holds it.
    send(engines()[other].url, prompt)
    eventually(lambda: indexed(prompt).get(other, 0) >= 30, "the index to learn the direct request", 30)
    assert {send(gateway, prompt) for _ in range(4)} == {other}


def test_routing_stays_correct_while_a_shard_restarts(gateway: str) -> None:
    prompt = words(600, seed=11)
    holder = send(gateway, prompt)
    eventually(lambda: indexed(prompt).get(holder, 0) >= 30, "the index to learn the placement", 30)
    shard = ensure_index(SHARDS, 2_500_000)[0]
    ray.kill(shard, no_restart=False)
    # While the shard restarts, lookups miss their budget or find half a chain: requests
    # still succeed. Once its subscriber has re-sent the engine's blocks, routing is exact.
    done = threading.Event()
    errors: list[str] = []

    def keep_sending() -> None:
        while not done.is_set():
            try:
                send(gateway, words(50, seed=99))
            except AssertionError as error:  # pragma: no cover - reported below
                errors.append(str(error))

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        eventually(lambda: indexed(prompt).get(holder, 0) >= 30, "the restarted shard to be rebuilt", 60)
    finally:
        done.set()
        sender.join()
    assert not errors
    assert {send(gateway, prompt) for _ in range(4)} == {holder}
