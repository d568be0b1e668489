"""Both user stores, the same contract: real Redis, and the SQLite file of the embedded store."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from rayfleet.protocol.users import User
from serve_apps.users.embedded_store import EmbeddedUserStore
from serve_apps.users.redis_store import RedisUserStore
from serve_apps.users.store import Admission, Identity, StoreError, UserStore, new_api_key
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="function")

StoreFactory = Callable[..., UserStore]


@pytest_asyncio.fixture(params=["redis", "embedded"], loop_scope="function")
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A factory of stores sharing one backend (like several gateway replicas)."""
    opened: list[UserStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("shared_redis_url")
        await _flush(url)

        def make(window_s: float = 60.0) -> UserStore:
            opened.append(RedisUserStore(url, timeout_s=1.0, window_s=window_s))
            return opened[-1]
    else:

        def make(window_s: float = 60.0) -> UserStore:
            opened.append(EmbeddedUserStore(tmp_path / "users.sqlite3", timeout_s=5.0, window_s=window_s))
            return opened[-1]

    yield make
    for store in opened:
        await store.close()


async def _flush(url: str) -> None:
    store = RedisUserStore(url)
    await store._redis.flushdb()
    await store.close()


async def _admit(store: UserStore, who: str, estimate: int = 1) -> Admission:
    return await store.admit(Identity("user", who), uuid.uuid4().hex, estimate)


async def test_users_and_keys_round_trip(open_store: StoreFactory) -> None:
    store = open_store()
    assert await store.create_user(User(name="alice", rpm=10, tpm=500))
    assert not await store.create_user(User(name="alice", rpm=1))  # taken: nothing changes
    assert await store.get_user("alice") == User(name="alice", rpm=10, tpm=500)
    assert await store.update_user(User(name="alice", rpm=20, tpm=0))
    assert not await store.update_user(User(name="nobody"))
    assert [u.name for u in await store.list_users()] == ["alice"]
    issued, digest = new_api_key("alice", 1.0)
    assert await store.add_key(issued, digest)
    assert not await store.add_key(new_api_key("nobody", 1.0)[0], "x" * 64)
    assert [k.id for k in await store.list_keys("alice")] == [issued.id]
    admitted = await store.admit(Identity("key", digest), "a1", 5)
    assert (admitted.verdict, admitted.user, admitted.rpm_limit, admitted.tpm_limit) == ("admitted", "alice", 20, 20_000)
    assert await store.delete_key("alice", issued.id)
    assert (await store.admit(Identity("key", digest), "a2", 5)).verdict == "unknown_key"
    assert (await store.delete_user("alice")).rpm == 20
    assert await store.get_user("alice") is None and await store.usage("alice") is None
    assert (await store.admit(Identity("user", "alice"), "a3", 5)).verdict == "unknown_user"


async def test_defaults_follow_aibrix(open_store: StoreFactory) -> None:
    store = open_store()
    await store.create_user(User(name="plain"))
    admission = await _admit(store, "plain")
    assert (admission.rpm_limit, admission.tpm_limit) == (100, 100_000)


async def test_a_thousand_concurrent_admissions_from_two_replicas_admit_exactly_the_limit(
    open_store: StoreFactory,
) -> None:
    first, second = open_store(), open_store()
    await first.create_user(User(name="busy", rpm=100, tpm=10**9))
    calls = [(first if i % 2 else second).admit(Identity("user", "busy"), uuid.uuid4().hex, 10) for i in range(1000)]
    verdicts = [a.verdict for a in await asyncio.gather(*calls)]
    assert verdicts.count("admitted") == 100 and verdicts.count("rpm") == 900


async def test_embedded_store_is_exact_across_processes(tmp_path: Path) -> None:
    """Two processes on one SQLite file (as two gateway replicas on one node) share one budget."""
    path = tmp_path / "users.sqlite3"
    await EmbeddedUserStore(path).create_user(User(name="shared", rpm=150, tpm=10**9))
    script = (
        "import asyncio, sys, uuid\n"
        "from serve_apps.users.embedded_store import EmbeddedUserStore\n"
        "from serve_apps.users.store import Identity\n"
        "store = EmbeddedUserStore(sys.argv[1], timeout_s=10)\n"
        "async def run():\n"
        "    return [(await store.admit(Identity('user', 'shared'), uuid.uuid4().hex, 1)).admitted for _ in range(200)]\n"
        "print(sum(asyncio.run(run())))\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]  # fmt: skip
    admitted = [int(worker.communicate(timeout=120)[0]) for worker in workers]
    assert sum(admitted) == 150


async def test_rpm_window_slides(open_store: StoreFactory) -> None:
    store = open_store(window_s=1.0)
    await store.create_user(User(name="slider", rpm=2, tpm=10**6))
    assert [(await _admit(store, "slider")).verdict for _ in range(3)] == ["admitted", "admitted", "rpm"]
    refused = await _admit(store, "slider")
    assert 0 < refused.requests_reset_s <= 1.0 and refused.requests == 2
    await asyncio.sleep(refused.requests_reset_s + 0.05)
    assert (await _admit(store, "slider")).verdict == "admitted"


async def test_tpm_reserves_then_charges_exactly(open_store: StoreFactory) -> None:
    store = open_store()
    await store.create_user(User(name="tokens", rpm=1000, tpm=100))
    ids = [uuid.uuid4().hex for _ in range(5)]
    verdicts = [(await store.admit(Identity("user", "tokens"), i, 30)).verdict for i in ids]
    # Reservations count while requests run: 0, 30, 60, 90 < 100 admit; 120 does not.
    assert verdicts == ["admitted"] * 4 + ["tpm"]
    for admission_id in ids[:4]:
        await store.settle("tokens", admission_id, 7, 30)
    usage = await store.usage("tokens")
    assert (usage.requests, usage.tokens) == (4, 28)
    crossing = uuid.uuid4().hex
    assert (await store.admit(Identity("user", "tokens"), crossing, 30)).verdict == "admitted"
    await store.settle("tokens", crossing, 500, 30)  # a long answer crosses the limit: charged in full
    assert (await store.usage("tokens")).tokens == 528
    refused = await store.admit(Identity("user", "tokens"), uuid.uuid4().hex, 1)
    assert refused.verdict == "tpm" and refused.tokens == 528 and refused.tokens_reset_s > 0


async def test_embedded_users_and_keys_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    issued, digest = new_api_key("kept", 1.0)
    store = EmbeddedUserStore(path)
    await store.create_user(User(name="kept", rpm=3, tpm=9))
    await store.add_key(issued, digest)
    await store.close()
    reopened = EmbeddedUserStore(path)
    assert await reopened.get_user("kept") == User(name="kept", rpm=3, tpm=9)
    assert (await reopened.admit(Identity("key", digest), "after-restart", 1)).user == "kept"
    await reopened.close()


async def test_redis_users_survive_a_redis_restart(redis_server: RedisServer) -> None:
    await _flush(redis_server.url)
    issued, digest = new_api_key("durable", 1.0)
    store = RedisUserStore(redis_server.url)
    await store.create_user(User(name="durable", rpm=5, tpm=50))
    await store.add_key(issued, digest)
    await store.close()
    redis_server.restart()  # SIGKILL, then start on the same append-only file
    store = RedisUserStore(redis_server.url)
    try:
        assert await store.get_user("durable") == User(name="durable", rpm=5, tpm=50)
        assert (await store.admit(Identity("key", digest), "after-restart", 1)).verdict == "admitted"
    finally:
        await store.close()


async def test_a_frozen_redis_fails_within_the_timeout(redis_server: RedisServer) -> None:
    store = RedisUserStore(redis_server.url, timeout_s=0.2)
    await store.create_user(User(name="frozen"))
    redis_server.freeze()
    started = time.monotonic()
    try:
        with pytest.raises(StoreError):
            await store.admit(Identity("user", "frozen"), "f1", 1)
        # Bounded by the 0.2 s socket timeout, with slack for a busy machine.
        assert time.monotonic() - started < 2.0
    finally:
        redis_server.thaw()
        await store.close()
