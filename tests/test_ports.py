"""Port picking, and engines that get new ports when their old ones were taken."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from engines.config import EngineConfig
from engines.launcher import EngineProcess
from rayfleet.ports import (
    BLOCK_RANGE,
    PORT_RANGE,
    ephemeral_range,
    free_port,
    listening_ports,
    port_in_use,
    unused_port_block,
)

pytestmark = pytest.mark.timeout(120)


@contextmanager
def listener(port: int) -> Iterator[None]:
    """Something else listening on ``port`` on every address, as a stray process would."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", port))
        sock.listen()
        yield


def test_picked_ports_are_outside_the_kernels_own_range_and_free() -> None:
    """The kernel hands ephemeral ports to outgoing connections and Ray picks its listeners'
    ports above one; a port picked there could be taken before its owner binds it."""
    ephemeral = ephemeral_range()
    if range(max(ephemeral.start, PORT_RANGE.start), min(ephemeral.stop, PORT_RANGE.stop)):
        pytest.skip(f"this kernel hands out ports {ephemeral.start}-{ephemeral.stop - 1} itself: no range is safe")
    for _ in range(50):
        port = free_port()
        assert port in PORT_RANGE and port not in ephemeral and not port_in_use("127.0.0.1", port)


def test_port_blocks_take_whole_free_slots_apart_from_single_ports() -> None:
    """A stack binds its block from the first port up over its life: a block never shares a
    port with another block or with single ports, and a slot with any listener is taken."""
    base = unused_port_block(512)
    assert (base - BLOCK_RANGE.start) % 512 == 0 and base + 511 in BLOCK_RANGE
    assert listening_ports().isdisjoint(range(base, base + 512))
    with listener(base + 300):
        assert port_in_use("127.0.0.1", base + 300) and base + 300 in listening_ports()
        assert all(unused_port_block(512) != base for _ in range(50))


def test_an_engine_whose_ports_were_taken_while_it_was_down_restarts_on_new_ones() -> None:
    """Port 0 is resolved at every start: an engine that kept the ports of its first start
    could never start again once anything else took one of them."""
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}
    engine = EngineProcess("ports-test", EngineConfig(model="ports-model", port=0, kv_events_config=events))

    async def start() -> tuple[str, tuple[str, str | None]]:
        await engine.start()
        return engine.url, engine.kv_event_endpoints()

    try:
        first_url, (first_events, first_replay) = asyncio.run(start())
        engine.stop()
        old_ports = [int(address.rsplit(":", 1)[1]) for address in (first_url, first_events, first_replay)]
        with listener(old_ports[0]), listener(old_ports[1]), listener(old_ports[2]):
            second_url, (second_events, second_replay) = asyncio.run(start())
            assert engine.alive()
        assert second_url != first_url and second_events != first_events and second_replay != first_replay
        assert engine.requested.port == 0 and engine.config.port == int(second_url.rsplit(":", 1)[1])
    finally:
        engine.stop()
