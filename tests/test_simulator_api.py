"""The simulator's HTTP API, against real simulator subprocesses.

Checked: vLLM's response and chunk shapes (validated against rayfleet.protocol.openai and
read through the official ``openai`` client), its error envelopes, the Prometheus metrics
moving with load, prefix caching and LoRA isolation, client-disconnect aborts, and the
simulator-only fault knobs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rayfleet.protocol import vllm_metrics as names
from rayfleet.protocol.openai import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from tests.simulator_fixtures import DEFAULT_MODEL, SimulatorProcess

pytestmark = pytest.mark.timeout(60)

CHAT_MESSAGES = [{"role": "user", "content": "Say something about caching."}]
# About 600 tokens: many full KV blocks, so a repeat can hit the prefix cache.
LONG_PROMPT = " ".join(f"fact number {i} is worth remembering." for i in range(100))
ENGINE_LABELS = {names.LABEL_MODEL_NAME: DEFAULT_MODEL, names.LABEL_ENGINE: "0"}
ALL_METRICS = [
    names.NUM_REQUESTS_RUNNING,
    names.NUM_REQUESTS_WAITING,
    names.KV_CACHE_USAGE_PERC,
    names.GPU_CACHE_USAGE_PERC,
    names.PREFIX_CACHE_QUERIES_TOTAL,
    names.PREFIX_CACHE_HITS_TOTAL,
    names.PROMPT_TOKENS_TOTAL,
    names.GENERATION_TOKENS_TOTAL,
    names.REQUEST_SUCCESS_TOTAL,
    names.NUM_PREEMPTIONS_TOTAL,
    f"{names.TIME_TO_FIRST_TOKEN_SECONDS}_bucket",
    f"{names.INTER_TOKEN_LATENCY_SECONDS}_count",
    f"{names.TIME_PER_OUTPUT_TOKEN_SECONDS}_sum",
    f"{names.E2E_REQUEST_LATENCY_SECONDS}_count",
    f"{names.REQUEST_PROMPT_TOKENS}_count",
    f"{names.REQUEST_GENERATION_TOKENS}_count",
    names.CACHE_CONFIG_INFO,
]


def openai_client(sim: SimulatorProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="unused", max_retries=0)


async def post(sim: SimulatorProcess, path: str, body: object) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}{path}", json=body) as response:
            return response.status, await response.read()


async def post_raw(sim: SimulatorProcess, path: str, data: bytes, content_type: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}{path}", data=data, headers={"Content-Type": content_type}) as response:
            return response.status, await response.read()


async def get(sim: SimulatorProcess, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.url}{path}") as response:
            return response.status, await response.read()


async def sse_events(sim: SimulatorProcess, path: str, body: dict) -> list[str]:
    """The raw ``data:`` payloads of a stream, ``[DONE]`` included; the body must end with it."""
    status, raw = await post(sim, path, body)
    assert status == 200, raw
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    return [event.removeprefix("data: ") for event in text.split("\n\n") if event]


class Metrics:
    """One scrape of /metrics, queried by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        wanted = {**ENGINE_LABELS, **labels}
        matches = [s.value for s in self.samples if s.name == name and wanted.items() <= s.labels.items()]
        assert matches, f"no sample {name}{wanted}"
        return sum(matches)

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


async def scrape(sim: SimulatorProcess) -> Metrics:
    status, raw = await get(sim, "/metrics")
    assert status == 200
    return Metrics(raw.decode())


async def wait_for_metrics(
    sim: SimulatorProcess, condition: Callable[[Metrics], bool], timeout: float = 20.0
) -> Metrics:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metrics = await scrape(sim)
        if condition(metrics):
            return metrics
        assert asyncio.get_running_loop().time() < deadline, "metrics never reached the expected state"
        await asyncio.sleep(0.05)


def assert_error(status: int, raw: bytes, expected_status: int, expected_type: str) -> ErrorResponse:
    assert status == expected_status, raw
    error = ErrorResponse.model_validate_json(raw)
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert error.error.type == expected_type
    assert error.error.code == expected_status
    return error


# --------------------------------------------------------------------------- completions


async def test_chat_completion_matches_vllm_shape_and_counts_usage(simulator: SimulatorProcess) -> None:
    body = {"model": DEFAULT_MODEL, "messages": CHAT_MESSAGES, "max_tokens": 8, "ignore_eos": True}
    status, raw = await post(simulator, "/v1/chat/completions", body)
    assert status == 200
    response = ChatCompletionResponse.model_validate_json(raw)
    assert response.id.startswith("chatcmpl-")
    assert response.model == DEFAULT_MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert (choice.finish_reason, choice.stop_reason, choice.logprobs) == ("length", None, None)
    _, tokenized = await post(simulator, "/tokenize", {"messages": CHAT_MESSAGES})
    prompt_tokens = TokenizeResponse.model_validate_json(tokenized).count
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 8)
    assert response.usage.total_tokens == prompt_tokens + 8


async def test_openai_client_streams_chat_with_role_chunk_and_usage(simulator: SimulatorProcess) -> None:
    stream = await openai_client(simulator).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CHAT_MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-") for chunk in chunks)
    opening = chunks[0].choices[0].delta
    assert (opening.role, opening.content) == ("assistant", "")
    content_chunks = [chunk for chunk in chunks[1:] if chunk.choices]
    assert len(content_chunks) == 6 and all(chunk.choices[0].delta.content for chunk in content_chunks)
    assert [chunk.choices[0].finish_reason for chunk in content_chunks][-2:] == [None, "length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 6


async def test_completion_stream_has_continuous_usage_done_and_same_text_as_unstreamed(
    simulator: SimulatorProcess,
) -> None:
    body = {"prompt": "The weather today", "max_tokens": 12, "seed": 7}
    status, raw = await post(simulator, "/v1/completions", body)
    assert status == 200
    whole = CompletionResponse.model_validate_json(raw)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    events = await sse_events(
        simulator,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    assert events[-1] == "[DONE]"
    chunks = [CompletionResponse.model_validate_json(event) for event in events[:-1]]
    assert all(chunk.usage is not None for chunk in chunks)
    text_chunks = [chunk for chunk in chunks if chunk.choices]
    assert len(text_chunks) > 1
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


async def test_chat_stream_chunks_validate_against_protocol(simulator: SimulatorProcess) -> None:
    events = await sse_events(
        simulator, "/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": 3, "stream": True}
    )
    chunks = [ChatCompletionStreamResponse.model_validate_json(event) for event in events[:-1]]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)  # no stream_options: no usage anywhere


async def test_completion_prompt_forms_and_prompt_token_counts(simulator: SimulatorProcess) -> None:
    client = openai_client(simulator)
    _, tokenized = await post(simulator, "/tokenize", {"prompt": "Once upon a time"})
    with_bos = TokenizeResponse.model_validate_json(tokenized)
    assert with_bos.max_model_len > 0 and with_bos.count == len(with_bos.tokens)
    for prompt in ("Once upon a time", ["Once upon a time"]):
        completion = await client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=2)
        assert completion.usage.prompt_tokens == with_bos.count
    by_ids = await client.completions.create(model=DEFAULT_MODEL, prompt=[11, 22, 33], max_tokens=2)
    assert by_ids.usage.prompt_tokens == 3
    status, raw = await post(simulator, "/v1/completions", {"prompt": ["one", "two"], "max_tokens": 2})
    assert_error(status, raw, 400, "BadRequestError")


async def test_ignore_eos_generates_exactly_max_tokens(simulator: SimulatorProcess) -> None:
    completion = await openai_client(simulator).completions.create(
        model=DEFAULT_MODEL, prompt="Count:", max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 40
    assert completion.choices[0].finish_reason == "length"


# --------------------------------------------------------------------------- other routes


async def test_models_health_version(simulator: SimulatorProcess) -> None:
    status, raw = await get(simulator, "/v1/models")
    models = ModelList.model_validate_json(raw)
    assert status == 200 and models.object == "list"
    (card,) = models.data
    assert (card.id, card.object, card.owned_by, card.root, card.parent) == (
        DEFAULT_MODEL,
        "model",
        "vllm",
        DEFAULT_MODEL,
        None,
    )
    assert card.max_model_len and card.created > 0
    listed = await openai_client(simulator).models.list()
    assert [model.id for model in listed.data] == [DEFAULT_MODEL]
    assert await get(simulator, "/health") == (200, b"")
    status, raw = await get(simulator, "/version")
    assert status == 200 and VersionResponse.model_validate_json(raw).version


async def test_detokenize_inverts_tokenize(simulator: SimulatorProcess) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "hello world", "add_special_tokens": False}
    _, raw = await post(simulator, "/tokenize", body)
    tokens = TokenizeResponse.model_validate_json(raw).tokens
    status, raw = await post(simulator, "/detokenize", {"tokens": tokens})
    assert status == 200
    text = DetokenizeResponse.model_validate_json(raw).prompt
    _, again = await post(simulator, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert TokenizeResponse.model_validate_json(again).tokens == tokens


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "message_part"),
    [
        ("/v1/chat/completions", {"model": DEFAULT_MODEL}, 400, "Bad Request", "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "Bad Request", "at least 1 item"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": -1}, 400, "BadRequestError", "max_tokens must be at least 1"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": "many"}, 400, "Bad Request", "max_tokens"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "Bad Request", "messages"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": 10**7}, 400, "BadRequestError", "maximum context length"),
        ("/v1/completions", {"max_tokens": 4}, 400, "Bad Request", "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "BadRequestError", "max_tokens must be at least 1"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "BadRequestError", "n must be 1"),
        ("/v1/completions", {"prompt": [5, 10**6]}, 400, "BadRequestError", "out of vocabulary"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "Bad Request", "stream"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "NotFoundError", "The model `nope` does not exist."),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/a"}, 400, "BadRequestError", "--enable-lora"),
    ],
)  # fmt: skip
async def test_bad_requests_get_vllm_error_envelopes(
    simulator: SimulatorProcess, path: str, body: dict, status: int, error_type: str, message_part: str
) -> None:
    actual_status, raw = await post(simulator, path, body)
    assert message_part in assert_error(actual_status, raw, status, error_type).error.message


async def test_malformed_bodies_are_400_or_415(simulator: SimulatorProcess) -> None:
    status, raw = await post_raw(simulator, "/v1/chat/completions", b"{not json", "application/json")
    assert_error(status, raw, 400, "Bad Request")
    status, raw = await post_raw(simulator, "/v1/completions", b'{"prompt": "hi"}', "text/plain")
    assert_error(status, raw, 415, "Unsupported Media Type")


async def test_openai_client_raises_typed_errors(simulator: SimulatorProcess) -> None:
    client = openai_client(simulator)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=CHAT_MESSAGES)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=DEFAULT_MODEL, prompt="hi", max_tokens=-5)


# --------------------------------------------------------------------------- metrics


async def test_metrics_have_vllm_names_and_count_generated_tokens(simulator: SimulatorProcess) -> None:
    before = await scrape(simulator)
    assert set(ALL_METRICS) <= before.names()
    assert names.LORA_REQUESTS_INFO not in before.names()  # LoRA disabled, as vLLM omits it
    await openai_client(simulator).completions.create(
        model=DEFAULT_MODEL, prompt="Tell me more", max_tokens=5, extra_body={"ignore_eos": True}
    )
    after = await scrape(simulator)
    generated = names.GENERATION_TOKENS_TOTAL
    assert after.value(generated) >= before.value(generated) + 5
    success = names.REQUEST_SUCCESS_TOTAL
    assert after.value(success, finished_reason="length") == before.value(success, finished_reason="length") + 1
    e2e_count = f"{names.E2E_REQUEST_LATENCY_SECONDS}_count"
    assert after.value(e2e_count) == before.value(e2e_count) + 1
    assert after.value(f"{names.INTER_TOKEN_LATENCY_SECONDS}_count") > before.value(
        f"{names.INTER_TOKEN_LATENCY_SECONDS}_count"
    )
    (cache_info,) = [s for s in after.samples if s.name == names.CACHE_CONFIG_INFO]
    assert (cache_info.labels["block_size"], cache_info.labels[names.LABEL_ENGINE], cache_info.value) == ("16", "0", 1)


async def test_repeated_prompt_hits_the_prefix_cache(simulator: SimulatorProcess) -> None:
    client = openai_client(simulator)
    await client.completions.create(model=DEFAULT_MODEL, prompt=LONG_PROMPT, max_tokens=1)
    before = await scrape(simulator)
    await client.completions.create(model=DEFAULT_MODEL, prompt=LONG_PROMPT, max_tokens=1)
    after = await scrape(simulator)
    assert after.value(names.PREFIX_CACHE_HITS_TOTAL) > before.value(names.PREFIX_CACHE_HITS_TOTAL)
    assert after.value(names.PREFIX_CACHE_QUERIES_TOTAL) > before.value(names.PREFIX_CACHE_QUERIES_TOTAL)


async def test_gauges_follow_load_and_disconnects_abort(simulator_factory: Callable[..., SimulatorProcess]) -> None:
    sim = simulator_factory("--gpu", "h100", "--time-scale", "2", "--max-num-seqs", "1")
    body = {"prompt": "A long story:", "max_tokens": 5000, "ignore_eos": True, "stream": True}
    session = aiohttp.ClientSession()
    responses = [await session.post(f"{sim.url}/v1/completions", json=body) for _ in range(2)]
    assert [response.status for response in responses] == [200, 200]
    loaded = await wait_for_metrics(
        sim,
        lambda m: m.value(names.NUM_REQUESTS_RUNNING) == 1
        and m.value(names.NUM_REQUESTS_WAITING) == 1
        and m.value(names.GENERATION_TOKENS_TOTAL) > 0,
    )
    assert loaded.value(names.KV_CACHE_USAGE_PERC) > 0
    assert loaded.value(names.KV_CACHE_USAGE_PERC) == loaded.value(names.GPU_CACHE_USAGE_PERC)
    await session.close()  # both clients vanish mid-stream
    drained = await wait_for_metrics(
        sim, lambda m: m.value(names.NUM_REQUESTS_RUNNING) == 0 and m.value(names.NUM_REQUESTS_WAITING) == 0
    )
    assert drained.value(names.REQUEST_SUCCESS_TOTAL, finished_reason="abort") == 2
    assert sim.stop() == 0  # SIGTERM is a clean exit


# --------------------------------------------------------------------------- LoRA


async def test_lora_load_use_unload_and_max_loras(simulator_factory: Callable[..., SimulatorProcess]) -> None:
    sim = simulator_factory(
        "--gpu", "instant", "--time-scale", "0",
        "--enable-lora", "--max-loras", "2", "--lora-modules", "sql=/adapters/sql",
    )  # fmt: skip
    status, raw = await post(sim, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/adapters/chat"})
    assert (status, raw.decode()) == (200, "Success: LoRA adapter 'chat' added successfully.")
    _, raw = await get(sim, "/v1/models")
    cards = {card.id: card for card in ModelList.model_validate_json(raw).data}
    assert set(cards) == {DEFAULT_MODEL, "sql", "chat"}
    assert (cards["sql"].parent, cards["sql"].root) == (DEFAULT_MODEL, "/adapters/sql")

    status, raw = await post(sim, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/adapters/chat"})
    assert "already been loaded" in assert_error(status, raw, 400, "InvalidUserInput").error.message
    status, raw = await post(sim, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": "/adapters/third"})
    assert "--max-loras" in assert_error(status, raw, 400, "BadRequestError").error.message
    status, raw = await post(sim, "/v1/load_lora_adapter", {"lora_name": "third"})
    assert_error(status, raw, 400, "Bad Request")

    client = openai_client(sim)
    await client.completions.create(model=DEFAULT_MODEL, prompt=LONG_PROMPT, max_tokens=1)
    before = await scrape(sim)
    completion = await client.completions.create(model="chat", prompt=LONG_PROMPT, max_tokens=1)
    assert completion.model == "chat"
    after_first = await scrape(sim)
    # The base model's cached blocks are not the adapter's: same prompt, no hit.
    assert after_first.value(names.PREFIX_CACHE_HITS_TOTAL) == before.value(names.PREFIX_CACHE_HITS_TOTAL)
    await client.completions.create(model="chat", prompt=LONG_PROMPT, max_tokens=1)
    after_second = await scrape(sim)
    assert after_second.value(names.PREFIX_CACHE_HITS_TOTAL) > after_first.value(names.PREFIX_CACHE_HITS_TOTAL)
    lora_info = [s for s in after_second.samples if s.name == names.LORA_REQUESTS_INFO]
    assert [s.labels[names.LABEL_MAX_LORA] for s in lora_info] == ["2"]

    status, raw = await post(sim, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert (status, raw.decode()) == (200, "Success: LoRA adapter 'chat' removed successfully.")
    status, raw = await post(sim, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert_error(status, raw, 404, "NotFoundError")
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="chat", prompt="hi", max_tokens=1)


# --------------------------------------------------------------------------- faults


async def test_fault_knobs_and_crash(simulator_factory: Callable[..., SimulatorProcess]) -> None:
    sim = simulator_factory("--gpu", "instant", "--time-scale", "0", "--error-rate", "1.0")
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT_MESSAGES})]:
        status, raw = await post(sim, path, body)
        assert assert_error(status, raw, 500, "InternalServerError").error.message == "Internal server error"
    status, raw = await post(sim, "/sim/faults", {"error_rate": 0.0, "added_latency_s": 0.01})
    assert (status, json.loads(raw)) == (200, {"error_rate": 0.0, "added_latency_s": 0.01})
    assert (await post(sim, "/v1/completions", {"prompt": "hi", "max_tokens": 2}))[0] == 200
    status, raw = await post(sim, "/sim/faults", {"error_rate": 2})
    assert_error(status, raw, 400, "Bad Request")
    with pytest.raises(aiohttp.ClientError):
        await post(sim, "/sim/crash", {})
    assert sim.process.wait(timeout=10) == 1
