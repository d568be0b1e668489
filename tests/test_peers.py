"""The peer routers of the routing benchmark, run for real in front of two simulators.

The routers are installed into rayfleet's home (``$RAYFLEET_HOME`` or ``~/.rayfleet``),
as the benchmark does, so only the first run on a machine downloads them from PyPI.
Requests go through the official ``openai`` client, as a user's would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench.peers import PeerSpec, running_peer
from tests.simulator_fixtures import DEFAULT_MODEL, start_simulator

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def worker_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    log_dir: Path = tmp_path_factory.mktemp("peer-workers")
    simulators = []
    try:
        for _ in range(2):
            simulators.append(start_simulator("--gpu", "instant", log_dir=log_dir))
        yield [simulator.url for simulator in simulators]
    finally:
        for simulator in simulators:
            simulator.stop()


def test_labels_round_trip_and_unknown_ones_say_what_exists() -> None:
    spec = PeerSpec.parse("sglang-router:cache_aware")
    assert (spec.name, spec.policy, spec.version) == ("sglang-router", "cache_aware", "0.3.2")
    assert spec.label == "sglang-router:cache_aware"
    assert PeerSpec.parse("vllm-router:consistent_hash").label == "vllm-router:consistent_hash"
    assert PeerSpec("vllm-router", "kv_aware").version == "0.1.17"

    cases = {
        "nginx:random": "unknown peer router 'nginx': choose one of sglang-router, vllm-router",
        "sglang-router:kv_aware": "sglang-router has no policy 'kv_aware': choose one of random, round_robin,",
        "vllm-router": "is not NAME:POLICY",
    }
    for label, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            PeerSpec.parse(label)


@pytest.mark.timeout(300)  # the first run on a machine installs the router from PyPI
@pytest.mark.parametrize("label", ["sglang-router:cache_aware", "vllm-router:round_robin"])
def test_streamed_chat_through_peer_router(label: str, worker_urls: list[str]) -> None:
    with running_peer(PeerSpec.parse(label), worker_urls) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": f"Say hello through {label}."}],
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    usage = chunks[-1].usage
    assert text.strip()
    assert finish_reasons[-1] == "length"
    assert usage is not None
    assert usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens > 0
