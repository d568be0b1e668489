"""A gateway replica's endpoint view holding requests until their model has a ready engine."""

from __future__ import annotations

import asyncio

from serve_apps.endpoints import Endpoint, RegistrySnapshot
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
