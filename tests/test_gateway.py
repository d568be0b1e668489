"""The gateway on a real Ray cluster, in front of real simulator processes, driven by the
official ``openai`` client and raw HTTP.
"""

from __future__ import annotations

import collections
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from serve_apps.routing import strategy_names
from tests.conftest import MODEL, deploy_app, free_port, pool_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(gateway_port: int) -> str:
    return deploy_app(pool_config(replicas=2, gpu="h100", time_scale=0.05), gateway_port, expected_ready=2)


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_chat_completion_through_gateway(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens >= 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["routing-strategy"] == "least-request"
    assert raw.headers["target-pod"].startswith("test-model-")
    assert raw.headers["request-id"]


def test_streaming_chat_relays_chunks_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the gateway must relay chunks as they come, not one blob"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_completions_endpoint(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].text


def test_engine_specific_fields_pass_through_untouched(gateway: str) -> None:
    """ignore_eos, max_completion_tokens, continuous_usage_stats and list content reach the engine."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "text", "text": "here"}]}],
        "max_completion_tokens": 7,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "some_future_field": {"kept": True},
    }
    status, headers, payload = post(f"{gateway}/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, payload
    events = [json.loads(line[6:]) for line in payload.decode().splitlines() if line.startswith("data: {")]
    assert payload.rstrip().endswith(b"data: [DONE]")
    assert all(event.get("usage") for event in events), "continuous_usage_stats: usage in every chunk"
    assert events[-1]["usage"]["completion_tokens"] == 7


def test_models_lists_the_pool_model(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]


def test_unknown_model_is_a_400_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (json.dumps({"messages": []}).encode(), "missing_model"),
        (json.dumps({"model": 3, "messages": []}).encode(), "invalid_type"),
        (json.dumps({"model": MODEL, "stream": "yes", "messages": []}).encode(), "invalid_type"),
    ],
)
def test_bad_bodies_get_openai_400s(gateway: str, body: bytes, code: str) -> None:
    status, _, payload = post(f"{gateway}/v1/chat/completions", body)
    assert status == 400
    assert json.loads(payload)["error"]["code"] == code


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
    ],
)
def test_engine_validation_errors_pass_through(gateway: str, body: dict) -> None:
    status, headers, payload = post(f"{gateway}/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    error = json.loads(payload)["error"]
    assert error["message"] and error["type"]
    assert headers["target-pod"].startswith("test-model-")


def test_unknown_strategy_lists_valid_names(gateway: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode()
    status, _, payload = post(f"{gateway}/v1/chat/completions", body, {"routing-strategy": "fastest-please"})
    assert status == 400
    message = json.loads(payload)["error"]["message"]
    assert "least-request" in message and "random" in message


def test_strategy_header_selects_random_and_spreads_load(gateway: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    pods = collections.Counter()
    for _ in range(40):
        status, headers, _ = post(f"{gateway}/v1/chat/completions", body, {"routing-strategy": "random"})
        assert status == 200 and headers["routing-strategy"] == "random"
        pods[headers["target-pod"]] += 1
    assert len(pods) == 2 and min(pods.values()) >= 5


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_is_selectable_by_header(gateway: str, strategy: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "pick"}], "max_tokens": 2}).encode()
    headers = {"routing-strategy": strategy, "x-session-id": "s-1", "user": "alice"}
    for _ in range(3):
        status, response_headers, payload = post(f"{gateway}/v1/chat/completions", body, headers)
        assert status == 200, payload
        assert response_headers["routing-strategy"] == strategy


def test_wrong_method_and_path(gateway: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{gateway}/v1/chat/completions", timeout=5)
    assert info.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{gateway}/v1/nothing", timeout=5)
    assert info.value.code == 404 and "error" in json.loads(info.value.read())


def test_pool_without_autoscaling_refuses_to_be_scaled(gateway: str) -> None:
    """An autoscaler left over from the previous config must not resize this pool."""
    import asyncio

    from ray import serve

    async def scale_then_read() -> dict[str, int]:
        manager = serve.get_deployment_handle("EngineManager", app_name="rayfleet")
        with pytest.raises(ValueError, match="has no autoscaling in the deployed config"):
            await manager.scale_pool.remote(MODEL, 1)
        return await manager.pool_scale.remote(MODEL)

    assert asyncio.run(scale_then_read())["replicas"] == 2


def test_a_drained_engine_cannot_be_revived_into_the_registry(gateway: str) -> None:
    """A reconcile tick that races a scale-down calls ``ensure_running`` on the draining engine;
    it must not register it again."""
    import ray

    from engines.config import EngineConfig
    from serve_apps.engine_pool import EngineActor
    from serve_apps.registry import get_registry

    actor = EngineActor.remote("retired-engine", "retired-model", EngineConfig(model="retired-model", port=0), "sim", {})
    try:
        ray.get(actor.ensure_running.remote(), timeout=60)
        ray.get(actor.drain.remote(timeout_s=30), timeout=60)
        with pytest.raises(ray.exceptions.RayTaskError, match="retired"):
            ray.get(actor.ensure_running.remote(), timeout=30)
        names = {e.name for e in ray.get(get_registry().snapshot.remote()).endpoints}
        assert "retired-engine" not in names
    finally:
        ray.kill(actor)


def test_model_without_ready_endpoint_is_503(gateway_port: int) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = pool_config(replicas=1)
    config["models"].append({"name": "offline-model", "static_endpoints": [dead]})
    url = deploy_app(config, gateway_port, expected_ready=1)
    body = json.dumps({"model": "offline-model", "messages": [{"role": "user", "content": "x"}]}).encode()
    deadline = time.monotonic() + 30
    while True:  # the static endpoint is known once the manager registered it
        status, _, payload = post(f"{url}/v1/chat/completions", body)
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 503
    assert json.loads(payload)["error"]["code"] == "no_ready_endpoint"
