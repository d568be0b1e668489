"""Prefix-aware routing: engine-identical block hashes, the approximate index, both strategies."""

from __future__ import annotations

import random
from typing import Any

import pytest

from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.tokenizer import NUM_WORD_TOKENS, get_tokenizer
from engines.simulator.lora import LoraAdapter
from engines.simulator.requests import RequestBuilder
from kvcache.hashing import BlockHasher
from rayfleet.protocol.kv_events import BlockStored
from rayfleet.protocol.openai import ChatCompletionRequest, CompletionRequest
from serve_apps.routing import build_strategy, options_model
from serve_apps.routing.base import PREFILL_ESTIMATE_KEY, EndpointState, RoutingRequest
from serve_apps.routing.prefix_cache import PrefixCacheStrategy
from serve_apps.routing.prefix_cache_and_load import PrefixCacheAndLoadStrategy
from serve_apps.routing.prefix_index import ApproximatePrefixIndex
from serve_apps.routing.prompt_blocks import block_hashes, prompt_token_ids

MAX_MODEL_LEN = 4096


def words(n: int, seed: int) -> str:
    return get_tokenizer().decode(random.Random(seed).choices(range(NUM_WORD_TOKENS), k=n))


def token_prompt(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(NUM_WORD_TOKENS), k=n)


def chat(system: str, user: str) -> RoutingRequest:
    body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return RoutingRequest("m", "/v1/chat/completions", body)


def completion(prompt: Any) -> RoutingRequest:
    return RoutingRequest("m", "/v1/completions", {"model": "m", "prompt": prompt})


def fleet(*loads: int) -> list[EndpointState]:
    return [EndpointState(f"e{i}", f"http://e{i}", in_flight=load) for i, load in enumerate(loads)]


def engine_block_hashes(
    request: RoutingRequest, config: EngineCoreConfig, adapter: LoraAdapter | None = None
) -> tuple[list[int], list[int]]:
    """The simulator's own prompt ids for the body, and the hashes its KV cache stores for them."""
    builder = RequestBuilder(get_tokenizer(), MAX_MODEL_LEN, "m")
    if "messages" in request.body:
        prepared = builder.chat(ChatCompletionRequest.model_validate({**request.body, "max_tokens": 1}), "r", adapter)
    else:
        prepared = builder.completion(CompletionRequest.model_validate({**request.body, "max_tokens": 1}), "r", adapter)
    stored: list[int] = []

    def sink(events: list[object]) -> None:
        stored.extend(h for event in events if isinstance(event, BlockStored) for h in event.block_hashes)

    engine = EngineCore(config, kv_event_sink=sink)
    engine.add_request(prepared.engine_request)
    while engine.has_unfinished_requests():
        engine.step()
    return prepared.engine_request.prompt_token_ids, stored


@pytest.mark.parametrize(
    "request_factory",
    [
        lambda: chat(words(300, 1), "What is in the text above?"),
        lambda: RoutingRequest(
            "m",
            "/v1/chat/completions",
            {
                "model": "m",
                "add_generation_prompt": False,
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": words(90, 2)}, {"type": "image_url"}]},
                    {"role": "assistant", "content": words(40, 3)},
                ],
            },
        ),
        lambda: completion(words(200, 4)),
        lambda: completion([words(77, 5)]),
        lambda: completion(token_prompt(161, 6)),
        lambda: completion([token_prompt(48, 7)]),
    ],
    ids=["chat", "chat-parts-no-generation-prompt", "text", "text-list", "token-ids", "token-id-list"],
)
def test_prompt_ids_and_block_hashes_equal_the_engines(request_factory: Any) -> None:
    request = request_factory()
    config = EngineCoreConfig(num_gpu_blocks=1024, max_model_len=MAX_MODEL_LEN)
    engine_ids, engine_hashes = engine_block_hashes(request, config)
    assert prompt_token_ids(request) == engine_ids
    assert len(engine_hashes) == len(engine_ids) // 16 > 0
    # The strategies' defaults hash as an engine with vLLM's defaults and rayfleet's seed.
    assert block_hashes(request, PrefixCacheStrategy().hasher) == engine_hashes


def test_an_adapters_requests_are_hashed_with_its_name_as_the_engine_does() -> None:
    config = EngineCoreConfig(num_gpu_blocks=1024, max_model_len=MAX_MODEL_LEN)
    adapter = LoraAdapter(name="sql-lora", path="/adapters/sql", lora_id=1, base_model_name="m")
    base = completion(words(200, 30))
    on_adapter = RoutingRequest("sql-lora", "/v1/completions", {**base.body, "model": "sql-lora"}, lora_name="sql-lora")
    _, engine_hashes = engine_block_hashes(on_adapter, config, adapter)
    assert block_hashes(on_adapter, PrefixCacheStrategy().hasher) == engine_hashes
    assert block_hashes(base, PrefixCacheStrategy().hasher) != engine_hashes  # same prompt, base model: other blocks


@pytest.mark.parametrize(("algo", "seed", "block_size"), [("sha256_cbor", "42", 16), ("xxhash", "0", 32)])
def test_gateway_hashes_follow_the_engines_algorithm_seed_and_block_size(algo: str, seed: str, block_size: int) -> None:
    request = completion(words(300, 20))
    config = EngineCoreConfig(
        num_gpu_blocks=1024, max_model_len=MAX_MODEL_LEN, block_size=block_size, prefix_caching_hash_algo=algo,
        hash_seed=seed,
    )  # fmt: skip
    _, engine_hashes = engine_block_hashes(request, config)
    options = {"hash_algo": algo, "hash_seed": seed, "block_size": block_size}
    strategy = build_strategy("prefix-cache-and-load", random.Random(0), options=options)
    assert block_hashes(request, strategy.hasher) == engine_hashes
    # Memoised per hasher: the default hasher's hashes are kept apart.
    assert block_hashes(request, BlockHasher()) != engine_hashes


def test_hash_options_are_validated() -> None:
    model = options_model("prefix-cache")
    assert model.model_validate({}).model_dump()["hash_algo"] == "sha256"
    with pytest.raises(ValueError, match="sha256_cbor"):
        model.model_validate({"hash_algo": "md5"})


def test_prompt_work_is_memoised_and_bad_bodies_give_no_blocks() -> None:
    request = chat(words(100, 8), "hi")
    hasher = BlockHasher()
    assert block_hashes(request, hasher) is block_hashes(request, BlockHasher())
    assert prompt_token_ids(request) is request.derived["prompt_token_ids"]
    for body in ({"model": "m"}, {"messages": "x"}, {"messages": [{"content": "no role"}]}, {"prompt": 3}):
        assert block_hashes(RoutingRequest("m", "/v1/completions", body), hasher) == []
    assert PrefixCacheStrategy(rng=random.Random(0)).choose(completion(7), fleet(3, 1, 2)).name == "e1"


def test_index_matches_leading_blocks_per_candidate() -> None:
    index = ApproximatePrefixIndex()
    hashes = [11, 12, 13, 14]
    index.record(hashes, "a")
    index.record(hashes[:2], "b")
    index.record([99, 13], "c")  # holds block 13 but not the prefix before it
    assert index.match(hashes, ["a", "b", "c", "d"]) == {"a": 4, "b": 2, "c": 0, "d": 0}
    assert index.match([11, 50], ["a"]) == {"a": 1}
    index.remove_endpoint("a")
    assert index.match(hashes, ["a", "b"]) == {"a": 0, "b": 2}
    assert len(index) == 4  # 11, 12, 99, 13; 14 was held only by "a"


def test_index_evicts_least_recently_used_blocks_tail_first() -> None:
    index = ApproximatePrefixIndex(max_blocks=10)
    first, second, third = list(range(100, 108)), list(range(200, 208)), list(range(300, 304))
    index.record(first, "a")
    index.record(second, "b")
    assert len(index) == 10
    # The first prompt lost its last six blocks, not its head, so it still matches 2 deep.
    assert index.match(first, ["a"]) == {"a": 2}
    assert index.match(second, ["b"]) == {"b": 8}
    # That match touched the second prompt; new blocks now evict the first prompt's head.
    index.record(third[:2], "c")
    assert index.match(first, ["a"]) == {"a": 0}
    assert index.match(second, ["b"]) == {"b": 8}
    index.record(third, "c")
    assert len(index) == 10
    assert index.match(second, ["b"]) == {"b": 6}


def test_shared_system_prompt_stays_on_one_endpoint() -> None:
    strategy = PrefixCacheStrategy(rng=random.Random(1))
    endpoints = fleet(0, 0, 0, 0)
    system = words(500, 9)
    chosen = {strategy.choose(chat(system, f"question {i}"), endpoints).name for i in range(30)}
    assert len(chosen) == 1
    # An unrelated prompt is free to go anywhere; a short one has no full block to match.
    other = {strategy.choose(chat(words(500, seed), "q"), endpoints).name for seed in range(10, 40)}
    assert len(other) > 1


def test_prefix_cache_spills_to_least_loaded_beyond_the_imbalance_bound() -> None:
    strategy = PrefixCacheStrategy(rng=random.Random(2))
    system = words(400, 10)
    home = strategy.choose(chat(system, "q0"), fleet(0, 0, 0)).name
    home_index = int(home[1:])

    def loads(home_load: int, others: int) -> list[EndpointState]:
        return fleet(*[home_load if i == home_index else others for i in range(3)])

    # Bound: in_flight > min + 8 and in_flight > 1.5 × mean.
    assert strategy.choose(chat(system, "q1"), loads(8, 0)).name == home  # 8 is not > 0 + 8
    assert strategy.choose(chat(system, "q2"), loads(30, 20)).name == home  # 30 < 1.5 × 23.3
    spilled = strategy.choose(chat(system, "q3"), loads(9, 0))
    assert spilled.name != home and spilled.in_flight == 0
    # The spill taught the index a second home; the less loaded of the two now wins.
    homes = {home, spilled.name}
    busy = fleet(*[5 if f"e{i}" == home else 2 if f"e{i}" in homes else 0 for i in range(3)])
    assert strategy.choose(chat(system, "q4"), busy).name == spilled.name


def test_no_match_picks_least_loaded_and_min_match_blocks_is_respected() -> None:
    strategy = PrefixCacheStrategy(rng=random.Random(3), min_match_blocks=4)
    prompt = token_prompt(48, 11)  # three full blocks: below the four required
    strategy.index.record(block_hashes(completion(prompt), strategy.hasher), "e0")
    assert strategy.choose(completion(prompt), fleet(1, 0, 2)).name == "e1"


def test_prefix_cache_and_load_prefers_the_cache_until_load_outweighs_the_saving() -> None:
    prompt = token_prompt(1024, 12)  # 64 blocks: the holder prefills 1 token, the others 1024

    def choice(holder_load: int, **options: Any) -> str:
        strategy = PrefixCacheAndLoadStrategy(rng=random.Random(4), load_tokens_per_request=256, **options)
        strategy.index.record(block_hashes(completion(prompt), strategy.hasher), "e0")
        return strategy.choose(completion(prompt), fleet(holder_load, 0)).name

    # Pure cost (no exploitation): 1 + 256 × load against 1024.
    assert [choice(load, exploit_threshold=1.0) for load in range(6)] == ["e0"] * 4 + ["e1"] * 2
    # Exploiting a >50% hit keeps the holder past that point, until the imbalance bound trips.
    assert [choice(load) for load in (4, 8, 9)] == ["e0", "e0", "e1"]


def test_prefix_cache_and_load_weighs_partial_matches() -> None:
    shared = token_prompt(512, 13)
    strategy = PrefixCacheAndLoadStrategy(rng=random.Random(5), load_tokens_per_request=256)
    strategy.index.record(block_hashes(completion(shared + token_prompt(512, 14)), strategy.hasher), "e0")
    # Half the prompt cached on e0 (not above the 0.5 exploit threshold): cost 512 + 256 × 1
    # beats 1024 on the idle e1, but not 512 + 256 × 3.
    assert strategy.choose(completion(shared + token_prompt(512, 15)), fleet(1, 0)).name == "e0"
    assert strategy.choose(completion(shared + token_prompt(512, 16)), fleet(3, 0)).name == "e1"


def test_prefix_cache_and_load_spreads_cache_misses_by_prefill_backlog() -> None:
    """Two misses at once: the second avoids the endpoint still computing the first's
    prompt, though in-flight counts are level; the backlog drains at the first token."""
    strategy = PrefixCacheAndLoadStrategy(rng=random.Random(6))
    candidates = fleet(1, 1)
    first = completion(token_prompt(2048, 21))
    chosen = strategy.choose(first, candidates)
    prefill = first.derived[PREFILL_ESTIMATE_KEY]
    assert prefill == len(prompt_token_ids(first))  # nothing cached: the whole prompt
    chosen.on_dispatch(0.0, prefill)
    second = strategy.choose(completion(token_prompt(2048, 22)), candidates)
    assert second is not chosen
    chosen.on_first_token(prefill)
    assert chosen.prefill_backlog == 0


@pytest.mark.parametrize("strategy_class", [PrefixCacheStrategy, PrefixCacheAndLoadStrategy])
def test_seeded_choices_are_reproducible(strategy_class: type) -> None:
    def run(seed: int) -> list[str]:
        strategy = strategy_class(rng=random.Random(seed))
        endpoints = fleet(0, 0, 0, 0)
        system = words(300, 20)
        names = []
        for i in range(40):
            request = chat(system if i % 2 else words(300, 100 + i), f"q{i}")
            chosen = strategy.choose(request, endpoints)
            chosen.in_flight += 1
            names.append(chosen.name)
        return names

    assert run(7) == run(7)
    assert len(set(run(7))) > 1


def test_the_gateways_view_tells_adapters_from_base_models() -> None:
    """How the gateway knows to hash a request as an adapter's (``RoutingRequest.lora_name``)."""
    from serve_apps.endpoints import Endpoint, RegistrySnapshot
    from serve_apps.view import EndpointView

    view = EndpointView()
    view.apply(RegistrySnapshot(version=1, endpoints=[
        Endpoint(name="e0", url="http://e0", model="m", models=["m", "sql-lora"], ready=True)]))  # fmt: skip
    assert view.is_adapter("sql-lora") and not view.is_adapter("m")
    assert [s.name for s in view.ready_endpoints("sql-lora")] == ["e0"]
