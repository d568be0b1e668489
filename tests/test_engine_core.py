"""EngineCore behaves like vLLM V1: batching limits, chunked prefill, prefix caching, preemption."""

from __future__ import annotations

import random
import statistics

import pytest

from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.latency import StepShape, step_ms
from engines.core.profiles import get_gpu_profile
from engines.core.tokenizer import NUM_WORD_TOKENS
from engines.core.types import EngineRequest, FinishReason, RequestOutput, SamplingSpec, StepResult
from kvcache.hashing import BlockHasher, lora_extra_keys
from rayfleet.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

MAX_STEPS = 20_000


def tokens(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(NUM_WORD_TOKENS), k=n)


def request(request_id: str, prompt: list[int], max_tokens: int = 8, **sampling: object) -> EngineRequest:
    sampling.setdefault("ignore_eos", True)
    return EngineRequest(request_id, prompt, SamplingSpec(max_tokens=max_tokens, **sampling))


def run(engine: EngineCore, steps: list[StepResult] | None = None) -> dict[str, list[RequestOutput]]:
    """Step until idle; every request's outputs in order."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            return outputs
        result = engine.step()
        if steps is not None:
            steps.append(result)
        for output in result.outputs:
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("engine did not drain")


def generated(outputs: list[RequestOutput]) -> list[int]:
    return [token_id for output in outputs for token_id in output.new_token_ids]


def test_continuous_batching_respects_max_num_seqs() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", max_num_seqs=4))
    for i in range(10):
        engine.add_request(request(f"r{i}", tokens(30, i), max_tokens=5 + i))
    engine.step()
    assert (engine.stats().num_running, engine.stats().num_waiting) == (4, 6)
    running_counts = []
    finished_order = []
    while engine.has_unfinished_requests():
        result = engine.step()
        running_counts.append(len(result.outputs))
        finished_order += [output.request_id for output in result.outputs if output.finished]
    assert max(running_counts) == 4
    # A finished request's slot goes to the next waiting request at once (continuous batching).
    assert finished_order[:2] == ["r0", "r1"]
    assert sorted(finished_order) == sorted(f"r{i}" for i in range(10))


def test_token_budget_bounds_each_step_and_chunks_prompts() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", max_num_batched_tokens=100))
    for i in range(5):
        engine.add_request(request(f"r{i}", tokens(30, i), max_tokens=3))
    steps: list[StepResult] = []
    run(engine, steps)
    assert all(step.num_prefill_tokens + step.num_decode_tokens <= 100 for step in steps)
    assert steps[0].num_prefill_tokens == 100  # 30 + 30 + 30 + a 10-token chunk of r3
    assert sorted(output.request_id for output in steps[0].outputs) == ["r0", "r1", "r2"]


def test_long_prompt_is_prefilled_in_chunks_and_samples_when_done() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="h100", max_num_batched_tokens=256))
    engine.add_request(request("long", tokens(1000, 1), max_tokens=2))
    steps: list[StepResult] = []
    outputs = run(engine, steps)
    assert [step.num_prefill_tokens for step in steps] == [256, 256, 256, 232, 0]
    assert [len(step.outputs) for step in steps] == [0, 0, 0, 1, 1]
    gpu = get_gpu_profile("h100")
    for index, step in enumerate(steps[:4]):
        shape = StepShape()
        shape.add_prefill_chunk(step.num_prefill_tokens, 256 * index)
        assert step.duration_s == pytest.approx(step_ms(gpu, shape) / 1e3)
    decode = StepShape()
    decode.add_decode(1001)
    assert steps[4].duration_s == pytest.approx(step_ms(gpu, decode) / 1e3)
    assert outputs["long"][-1].finish_reason is FinishReason.LENGTH


def test_repeated_prompt_hits_prefix_cache_but_never_its_last_token() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant"))
    prompt = tokens(96, 2)  # exactly six blocks
    engine.add_request(request("first", prompt))
    first = run(engine)["first"]
    engine.add_request(request("again", prompt))
    again = run(engine)["again"]
    assert first[0].num_cached_tokens == 0
    assert again[-1].num_cached_tokens == 80  # five blocks: the sixth holds the last prompt token
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (192, 80)
    assert stats.prompt_tokens == 192


def test_shared_prefix_prompts_share_blocks_within_one_step() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", num_gpu_blocks=100))
    prefix = tokens(64, 3)
    engine.add_request(request("a", prefix + tokens(20, 4), max_tokens=4))
    engine.add_request(request("b", prefix + tokens(20, 5), max_tokens=4))
    result = engine.step()
    assert {output.request_id: output.num_cached_tokens for output in result.outputs} == {"a": 0, "b": 64}
    assert result.num_prefill_tokens == 84 + 20
    # 4 shared prefix blocks + 2 own blocks each, instead of 6 each.
    assert engine.stats().kv_cache_usage == pytest.approx(8 / 100)


def test_freed_blocks_are_evicted_tail_first() -> None:
    events: list[object] = []
    engine = EngineCore(EngineCoreConfig(gpu="instant", num_gpu_blocks=10), kv_event_sink=events.extend)
    prompt = tokens(80, 6)  # five full blocks
    engine.add_request(request("a", prompt, max_tokens=1))
    run(engine)
    stored = [event for event in events if isinstance(event, BlockStored)]
    a_hashes = stored[0].block_hashes
    assert len(a_hashes) == 5 and engine.stats().kv_cache_usage == 0.0
    # Six fresh blocks: the five never used, then the LRU head, which is a's *last* block.
    engine.add_request(request("b", tokens(96, 7), max_tokens=1))
    run(engine)
    removed = [h for event in events if isinstance(event, BlockRemoved) for h in event.block_hashes]
    assert removed == [a_hashes[-1]]
    engine.add_request(request("a-again", prompt, max_tokens=1))
    assert run(engine)["a-again"][0].num_cached_tokens == 64


def test_preemption_recomputes_most_recent_request_and_everyone_finishes() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="h100", num_gpu_blocks=8))  # 128 tokens of KV
    assert engine.max_model_len == 128
    for i in range(4):
        engine.add_request(request(f"r{i}", tokens(20, 10 + i), max_tokens=60))
    steps: list[StepResult] = []
    outputs = run(engine, steps)
    first = next(step for step in steps if step.num_preempted)
    assert first.num_preempted == 2  # r3 for r0's block, then r2 could not get one itself
    assert sorted(output.request_id for output in first.outputs) == ["r0", "r1"]
    stats = engine.stats()
    assert stats.num_preemptions == sum(step.num_preempted for step in steps) >= 2
    for i in range(4):
        reply = outputs[f"r{i}"]
        assert [output.num_output_tokens for output in reply] == list(range(1, 61))
        assert reply[-1].finished and reply[-1].finish_reason is FinishReason.LENGTH
    assert stats.generation_tokens == 240 and stats.kv_cache_usage == 0.0
    # Re-admission after preemption is a new prefix-cache lookup, counted again.
    assert stats.prefix_cache_queries > 4 * 20


def test_preempted_request_continues_the_same_token_stream() -> None:
    prompts = [tokens(20, 10 + i) for i in range(4)]
    replies = []
    preemptions = []
    for blocks in (8, 100):
        engine = EngineCore(EngineCoreConfig(gpu="instant", num_gpu_blocks=blocks))
        for i, prompt in enumerate(prompts):
            engine.add_request(request(f"r{i}", prompt, max_tokens=60))
        replies.append({rid: generated(out) for rid, out in run(engine).items()})
        preemptions.append(engine.stats().num_preemptions)
    assert preemptions[0] > 0 and preemptions[1] == 0
    assert replies[0] == replies[1]


def test_output_lengths_follow_ignore_eos_max_and_min_tokens() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant"))
    prompt = tokens(10, 20)
    engine.add_request(request("exact", prompt, max_tokens=37))
    engine.add_request(request("short", prompt, max_tokens=3, ignore_eos=False))
    engine.add_request(request("floor", prompt, max_tokens=700, min_tokens=500, ignore_eos=False))
    for i in range(200):
        engine.add_request(request(f"free{i}", prompt, max_tokens=100_000, ignore_eos=False))
    outputs = run(engine)
    assert len(generated(outputs["exact"])) == 37 and outputs["exact"][-1].finish_reason is FinishReason.LENGTH
    assert len(generated(outputs["short"])) <= 3
    assert 500 <= len(generated(outputs["floor"])) <= 700
    lengths = [len(generated(outputs[f"free{i}"])) for i in range(200)]
    assert 130 < statistics.median(lengths) < 300
    assert all(outputs[f"free{i}"][-1].finish_reason is FinishReason.STOP for i in range(200))
    assert all(0 <= t < NUM_WORD_TOKENS for out in outputs.values() for t in generated(out))


def test_lengths_and_tokens_are_reproducible_by_seed_or_request_id() -> None:
    def reply(engine_seed: int, request_id: str, seed: int | None) -> list[int]:
        engine = EngineCore(EngineCoreConfig(gpu="instant", seed=engine_seed))
        engine.add_request(request(request_id, tokens(10, 0), max_tokens=2000, ignore_eos=False, seed=seed))
        return generated(run(engine)[request_id])

    assert reply(0, "x", None) == reply(0, "x", None)
    assert reply(0, "x", None) != reply(0, "y", None)
    assert reply(0, "x", None) != reply(1, "x", None)
    assert reply(0, "x", 42) == reply(1, "y", 42)


def test_context_limit_stops_with_length() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", max_model_len=64))
    engine.add_request(request("edge", tokens(60, 30), max_tokens=100))
    reply = run(engine)["edge"]
    assert len(generated(reply)) == 4 and reply[-1].finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_at_once() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", num_gpu_blocks=50, max_num_seqs=1))
    engine.add_request(request("running", tokens(100, 40), max_tokens=50))
    engine.add_request(request("waiting", tokens(100, 41), max_tokens=50))
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    aborted = engine.abort_request("running")
    assert aborted is not None and aborted.finished and aborted.finish_reason is FinishReason.ABORT
    assert aborted.num_output_tokens == 1 and aborted.num_prompt_tokens == 100
    assert engine.stats().kv_cache_usage == 0.0
    assert engine.abort_request("waiting") is not None
    assert engine.abort_request("waiting") is None
    assert not engine.has_unfinished_requests()
    assert engine.step().outputs == [] and engine.step().duration_s == 0.0


def test_kv_events_for_store_decode_fill_lora_and_reset() -> None:
    events: list[object] = []
    engine = EngineCore(EngineCoreConfig(gpu="instant"), kv_event_sink=events.extend)
    prompt = tokens(40, 50)
    engine.add_request(request("base", prompt, max_tokens=9))
    engine.step()
    assert not engine.reset_prefix_cache()  # blocks in use
    run(engine)
    stored = [event for event in events if isinstance(event, BlockStored)]
    first, filled = stored[0], stored[-1]
    assert (first.parent_block_hash, first.block_size, first.lora_id, first.lora_name) == (None, 16, None, None)
    assert (first.extra_keys, first.group_idx, first.kv_cache_spec_kind) == ([None, None], 0, "full_attention")
    assert first.token_ids == prompt[:32] and len(first.block_hashes) == 2
    # The decode that completes the third block (token 48) caches it, chained to the second.
    assert filled.parent_block_hash == first.block_hashes[-1] and len(filled.block_hashes) == 1
    assert filled.token_ids[:8] == prompt[32:40]
    assert engine.reset_prefix_cache()
    assert isinstance(events[-1], AllBlocksCleared)


def test_lora_blocks_do_not_match_base_model_blocks() -> None:
    events: list[object] = []
    engine = EngineCore(EngineCoreConfig(gpu="instant"), kv_event_sink=events.extend)
    prompt = tokens(40, 60)
    engine.add_request(request("base", prompt))
    sampling = SamplingSpec(max_tokens=8, ignore_eos=True)
    engine.add_request(EngineRequest("lora", prompt, sampling, lora_id=1, lora_name="sql"))
    result = engine.step()
    assert [output.num_cached_tokens for output in result.outputs] == [0, 0]
    stored = [event for event in events if isinstance(event, BlockStored)]
    assert [(event.lora_id, event.lora_name) for event in stored] == [(None, None), (1, "sql")]
    assert stored[1].extra_keys == [("sql",), ("sql",)]
    assert set(stored[0].block_hashes).isdisjoint(stored[1].block_hashes)
    # vLLM keys adapter blocks by name: a gateway that knows the name computes the same hashes.
    assert stored[1].block_hashes == BlockHasher().chain(prompt, lora_extra_keys("sql"))
    with pytest.raises(ValueError, match="both lora_id and lora_name"):
        engine.add_request(EngineRequest("half", prompt, sampling, lora_id=2))


def stored_hashes(config: EngineCoreConfig, prompt: list[int]) -> list[int]:
    events: list[object] = []
    engine = EngineCore(config, kv_event_sink=events.extend)
    engine.add_request(request("q", prompt, max_tokens=1))
    run(engine)
    return [h for event in events if isinstance(event, BlockStored) for h in event.block_hashes]


def test_block_hashes_agree_across_engines_with_the_same_algorithm_and_seed() -> None:
    prompt = tokens(64, 70)
    h100 = stored_hashes(EngineCoreConfig(gpu="h100", seed=0), prompt)
    assert stored_hashes(EngineCoreConfig(gpu="l40s", seed=1), prompt) == h100 and len(h100) == 4
    assert h100 == BlockHasher("sha256", "0").chain(prompt)
    cbor = stored_hashes(EngineCoreConfig(prefix_caching_hash_algo="sha256_cbor", hash_seed="7"), prompt)
    assert cbor == BlockHasher("sha256_cbor", "7").chain(prompt) and set(cbor).isdisjoint(h100)
    # Without a seed each engine draws its own root, as vLLM does without PYTHONHASHSEED.
    unseeded = [stored_hashes(EngineCoreConfig(hash_seed=None), prompt) for _ in range(2)]
    assert set(unseeded[0]).isdisjoint(unseeded[1])


def test_without_prefix_caching_nothing_is_shared_or_counted() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", enable_prefix_caching=False))
    prompt = tokens(64, 80)
    for i in range(2):
        engine.add_request(request(f"r{i}", prompt))
    outputs = run(engine)
    assert [outputs[f"r{i}"][0].num_cached_tokens for i in range(2)] == [0, 0]
    assert (engine.stats().prefix_cache_queries, engine.stats().prefix_cache_hits) == (0, 0)


def test_invalid_requests_and_configs_are_refused() -> None:
    engine = EngineCore(EngineCoreConfig(gpu="instant", max_model_len=100))
    engine.add_request(request("dup", tokens(5, 0)))
    with pytest.raises(ValueError):
        engine.add_request(request("dup", tokens(5, 0)))
    with pytest.raises(ValueError):
        engine.add_request(request("too-long", tokens(100, 0)))
    with pytest.raises(ValueError):
        engine.add_request(request("empty", []))
    with pytest.raises(ValueError):
        engine.add_request(request("no-output", tokens(5, 0), max_tokens=0))
    with pytest.raises(ValueError):
        EngineCore(EngineCoreConfig(num_gpu_blocks=4, max_model_len=100))
    with pytest.raises(ValueError):
        EngineCore(EngineCoreConfig(gpu="v100"))
    assert EngineCore(EngineCoreConfig(gpu="l40s")).max_model_len == 131072
