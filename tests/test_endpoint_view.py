"""A gateway replica holding requests until their model has a ready engine: its endpoint view, and the
gateway letting a held caller go."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from rayfleet.protocol.users import User
from serve_apps.config import AppConfig
from serve_apps.endpoints import Endpoint, RegistrySnapshot
from serve_apps.errors import GatewayError
from serve_apps.gateway import GatewayApp
from serve_apps.users.embedded_store import EmbeddedUserStore
from serve_apps.users.limiter import Limiter
from serve_apps.users.store import Identity
from serve_apps.view import EndpointView

MODEL = "demo"


def snapshot(version: int, *ready: bool) -> RegistrySnapshot:
    endpoints = [Endpoint(name=f"e{i}", url=f"http://127.0.0.1:{9000 + i}", model=MODEL, ready=r) for i, r in enumerate(ready)]
    return RegistrySnapshot(version=version, endpoints=endpoints)


async def test_a_held_request_gets_the_first_ready_endpoint_and_is_counted_meanwhile() -> None:
    view = EndpointView()
    view.apply(snapshot(1))
    waiter = asyncio.create_task(view.wait_ready(MODEL, timeout_s=30))
    await asyncio.sleep(0.01)
    assert view.waiting_by_model() == {MODEL: 1}
    view.apply(snapshot(2, False))  # an engine starting: not ready yet, keep waiting
    await asyncio.sleep(0.01)
    assert not waiter.done()
    view.apply(snapshot(3, False, True))
    ready = await asyncio.wait_for(waiter, 5)
    assert [state.name for state in ready] == ["e1"]
    assert view.waiting_by_model() == {}


async def test_a_held_request_gives_up_at_its_timeout() -> None:
    view = EndpointView()
    view.apply(snapshot(1, False))
    assert await view.wait_ready(MODEL, timeout_s=0.05) == []
    assert view.waiting_by_model() == {}
    view.apply(snapshot(2, True))
    assert [state.name for state in await view.wait_ready(MODEL, timeout_s=0)] == ["e0"]  # ready: no wait at all


async def test_a_held_caller_that_hangs_up_is_let_go_with_its_reservation_back(tmp_path: Path) -> None:
    """While its pool is at zero, a held request is demand for an engine: once its caller
    has gone it must stop counting as waiting, and its tokens go back to the user's budget."""
    config = AppConfig.model_validate({
        "users": {"enabled": True, "admin_token": "admin-token-123"},
        "models": [{"name": MODEL, "pool": {"replicas": 0, "engine_config": {"model": MODEL}},
                    "autoscaling": {"strategy": "KPA", "min_replicas": 0, "max_replicas": 1}}],
    })  # fmt: skip
    limiter = Limiter(config.users, EmbeddedUserStore(tmp_path / "users.sqlite3"))
    await limiter.store.create_user(User(name="dora", rpm=10, tpm=900))
    view = EndpointView()
    view.apply(snapshot(1))
    app = GatewayApp(config, view, limiter=limiter)
    hang_up = asyncio.Event()
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900})
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"user", b"dora")]}
    call = asyncio.create_task(app(scope, receive, send))
    await asyncio.sleep(0.05)
    assert view.waiting_by_model() == {MODEL: 1} and not call.done()
    with pytest.raises(GatewayError, match="exceeded TPM"):
        await limiter.admit(Identity("user", "dora"), 1)  # the held request's reservation fills the budget
    hang_up.set()
    await asyncio.wait_for(call, 5)
    assert view.waiting_by_model() == {} and sent == []  # nobody to answer
    assert await limiter.admit(Identity("user", "dora"), 1) is not None
    await app.close()
