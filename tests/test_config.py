"""Configuration and the pure routing seam: no cluster needed."""

from __future__ import annotations

import argparse
import collections
import random
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from engines.config import EngineConfig, LoraModule, SimulatorOptions, add_engine_arguments, config_from_args
from kvcache.hashing import BlockHasher
from serve_apps.config import AppConfig
from serve_apps.routing import EndpointState, RoutingRequest, build_strategies, strategy_names
from serve_apps.routing.base import extract_prompt_text

REPO = Path(__file__).resolve().parents[1]


def test_engine_config_round_trips_through_the_simulator_command_line() -> None:
    config = EngineConfig(
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_model_name="llama",
        port=9123,
        tensor_parallel_size=2,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
        num_gpu_blocks_override=4096,
        max_model_len=32768,
        enable_prefix_caching=False,
        prefix_caching_hash_algo="xxhash_cbor",
        enable_lora=True,
        max_loras=3,
        lora_modules=[LoraModule(name="sql", path="/adapters/sql")],
        kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq"},
        distributed_executor_backend="ray",
        sim=SimulatorOptions(gpu="h200", time_scale=5.0, seed=3, error_rate=0.25, added_latency_s=0.5),
    )
    command = config.command("sim")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, simulator=True)
    assert command[1:5] == ["-m", "engines.simulator", "serve", config.model]
    assert config_from_args(parser.parse_args(command[4:])) == config


def test_vllm_command_line_uses_vllm_flags_only() -> None:
    config = EngineConfig(model="m", port=8000, tensor_parallel_size=4, distributed_executor_backend="ray")
    command = config.command("vllm")
    assert command[command.index("serve") + 1] == "m"
    assert "--gpu" not in command and "--time-scale" not in command
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    assert command[command.index("--distributed-executor-backend") + 1] == "ray"
    assert "--enable-prefix-caching" in command
    assert command[command.index("--prefix-caching-hash-algo") + 1] == "sha256"


def test_engines_get_a_python_hash_seed_so_their_block_hashes_agree() -> None:
    """vLLM roots its block hashes in PYTHONHASHSEED; unset, every engine draws its own root."""
    assert EngineConfig().environment() == {"PYTHONHASHSEED": "0"}
    assert EngineConfig(hash_seed="17").environment() == {"PYTHONHASHSEED": "17"}
    assert EngineConfig(hash_seed=None).environment() == {}


def test_shipped_serve_config_validates_and_builds() -> None:
    from serve_apps.app import build_app

    document = yaml.safe_load((REPO / "serve_apps" / "serve_config.yaml").read_text())
    (application,) = document["applications"]
    assert application["import_path"] == "serve_apps.app:build_app"
    config = AppConfig.model_validate(application["args"])
    assert config.models[0].pool.replicas >= 1
    assert build_app(application["args"]) is not None


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"gateway": {"default_strategy": "fastest"}}, "valid: least-busy-time, least-kv-cache"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "model listed twice: a"),
        ({"models": [{"name": "a", "default_strategy": "nope"}]}, "unknown routing strategy"),
        ({"models": [{"name": "a", "pool": {"replicas": -1}}]}, "greater than or equal to 0"),
        ({"models": [{"name": "a", "pool": {"engine_config": {"served_model_name": "b"}}}]}, "serves 'b'"),
        ({"gatway": {}}, "Extra inputs are not permitted"),
        ({"gateway": {"strategy_options": {"prefix-cache": {"imbalance_abz": 2}}}}, "its options: imbalance_abs"),
        ({"gateway": {"strategy_options": {"prefix-cache": {"imbalance_abs": "many"}}}}, "imbalance_abs: Input should"),
        ({"gateway": {"strategy_options": {"quickest": {}}}}, "unknown routing strategy 'quickest'"),
        ({"gateway": {"scrape_interval_s": 0}}, "greater than 0"),
    ],
)
def test_bad_app_configs_are_rejected_with_the_reason(raw: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(raw)
    assert fragment in str(info.value)


def test_strategy_options_reach_the_strategies() -> None:
    """Options are the constructors' own knobs, layered: signal ages follow the scrape
    interval, prefix strategies hash like the model's engines, then the gateway's options,
    then the model's."""
    from serve_apps.routing import build_strategies

    config = AppConfig.model_validate({
        "gateway": {"scrape_interval_s": 0.25, "strategy_options": {"prefix-cache": {"imbalance_abs": 2}}},
        "models": [
            {"name": "a", "pool": {"engine_config": {"prefix_caching_hash_algo": "xxhash", "hash_seed": "9",
                                                      "block_size": 32}},
             "strategy_options": {"prefix-cache": {"imbalance_ratio": 3.0}}},
            {"name": "b"},
        ],
    })  # fmt: skip
    a = build_strategies(0, config.routing_options(config.models[0]))
    assert (a["prefix-cache"]._bound.absolute, a["prefix-cache"]._bound.ratio) == (2, 3.0)
    assert a["prefix-cache-and-load"].hasher.memo_key == BlockHasher("xxhash", "9", 32).memo_key
    b = build_strategies(0, config.routing_options(config.models[1]))
    assert b["prefix-cache"]._bound.ratio == 1.5 and b["prefix-cache"].hasher.memo_key == BlockHasher().memo_key
    assert b["least-kv-cache"]._max_age_s == 1.0


def test_pool_engines_answer_to_the_model_name() -> None:
    config = AppConfig.model_validate({"models": [{"name": "chat", "pool": {"engine_config": {"model": "/weights/x"}}}]})
    assert config.models[0].pool.engine_config.name == "chat"


def _request(body: dict | None = None) -> RoutingRequest:
    return RoutingRequest(model="m", path="/v1/chat/completions", body=body or {})


def test_least_request_picks_the_fewest_in_flight_and_spreads_ties() -> None:
    strategy = build_strategies(seed=1)["least-request"]
    busy, idle = EndpointState("busy", "http://a", in_flight=5), EndpointState("idle", "http://b", in_flight=1)
    assert all(strategy.choose(_request(), [busy, idle]) is idle for _ in range(20))
    level = [EndpointState(f"e{i}", f"http://{i}") for i in range(3)]
    picks = collections.Counter(strategy.choose(_request(), level).name for _ in range(300))
    assert set(picks) == {"e0", "e1", "e2"} and min(picks.values()) > 60


def test_random_is_uniform_and_seeded() -> None:
    endpoints = [EndpointState(f"e{i}", f"http://{i}") for i in range(4)]
    first = [build_strategies(seed=9)["random"].choose(_request(), endpoints).name for _ in range(50)]
    again = [build_strategies(seed=9)["random"].choose(_request(), endpoints).name for _ in range(50)]
    assert first == again
    picks = collections.Counter(build_strategies(seed=random.randrange(1000))["random"].choose(_request(), endpoints).name for _ in range(400))
    assert len(picks) == 4 and min(picks.values()) > 60


def test_every_documented_strategy_is_registered() -> None:
    assert strategy_names() == sorted([
        "random", "least-request", "power-of-two", "throughput", "least-busy-time", "least-kv-cache",
        "least-latency", "prefix-cache", "prefix-cache-and-load", "vtc-basic", "session-affinity",
    ])  # fmt: skip


def test_prompt_text_reads_messages_parts_and_prompts() -> None:
    chat = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]}]}
    assert extract_prompt_text(chat) == "sys\na\nb"
    assert extract_prompt_text({"prompt": "hello"}) == "hello"
    assert extract_prompt_text({"prompt": ["x", "y"]}) == "x\ny"
    assert extract_prompt_text({"prompt": [1, 2, 3]}) == ""
    request = _request(chat)
    assert request.prompt_text == request.prompt_text == "sys\na\nb"
