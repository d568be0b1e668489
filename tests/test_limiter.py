"""The gateway's limiter over a real embedded store: identities, answers and store outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rayfleet.protocol.users import User
from serve_apps.config import UsersConfig
from serve_apps.errors import GatewayError
from serve_apps.usage import Usage
from serve_apps.users.embedded_store import EmbeddedUserStore
from serve_apps.users.limiter import Limiter, token_estimate
from serve_apps.users.redis_store import RedisUserStore
from serve_apps.users.store import Admission, Identity, StoreError, key_digest
from tests.redis_fixtures import RedisServer

def limiter(tmp_path: Path, **settings: object) -> Limiter:
    config = UsersConfig(enabled=True, admin_token="admin-token-123", **settings)
    return Limiter(config, EmbeddedUserStore(tmp_path / "users.sqlite3"))


def test_identity_rules(tmp_path: Path) -> None:
    open_ = limiter(tmp_path)
    assert open_.identify({}) is None
    assert open_.identify({"authorization": "Bearer EMPTY"}) is None  # the openai client's placeholder
    assert open_.identify({"authorization": "Bearer admin-token-123", "user": "x"}) is None
    assert open_.identify({"user": "alice"}) == Identity("user", "alice")
    assert open_.identify({"authorization": "Bearer rf-abc", "user": "bob"}) == Identity("key", key_digest("rf-abc"))

    strict = limiter(tmp_path, require_api_keys=True, anonymous="reject")
    with pytest.raises(GatewayError, match="an API key is required") as error:
        strict.identify({"user": "alice"})
    assert error.value.status == 401
    with pytest.raises(GatewayError, match="not valid"):
        strict.identify({"authorization": "Bearer sk-something"})
    with pytest.raises(GatewayError, match="must identify a user"):
        limiter(tmp_path, anonymous="reject").identify({})


def test_token_estimate_reserves_prompt_bytes_and_output_cap() -> None:
    assert token_estimate(400, {"max_tokens": 50}, 256) == 150
    assert token_estimate(400, {"max_completion_tokens": 20, "max_tokens": 50}, 256) == 120
    assert token_estimate(400, {"max_tokens": "lots"}, 256) == 356
    assert token_estimate(400, {}, 256) == 356


async def test_refusals_carry_aibrix_text_and_headers(tmp_path: Path) -> None:
    subject = limiter(tmp_path)
    await subject.store.create_user(User(name="carol", rpm=1, tpm=1000))
    ticket = await subject.admit(Identity("user", "carol"), 10)
    assert ticket is not None and dict(ticket.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    with pytest.raises(GatewayError) as refused:
        await subject.admit(Identity("user", "carol"), 10)
    error = refused.value
    assert (error.status, error.message, error.code) == (429, "user: carol has exceeded RPM: 1", "rate_limit_exceeded")
    headers = dict(error.headers)
    assert headers[b"x-error-rpm-exceeded"] == b"true" and int(headers[b"retry-after"]) >= 1
    assert headers[b"x-ratelimit-reset-requests"].endswith(b"s")
    await subject.settle(ticket, Usage(5, 7))
    assert (await subject.store.usage("carol")).tokens == 12
    with pytest.raises(GatewayError, match="user: dave does not exist") as unknown:
        await subject.admit(Identity("user", "dave"), 1)
    assert unknown.value.status == 401


class _BrokenStore(EmbeddedUserStore):
    calls = 0
    error: Exception = StoreError("down")

    async def admit(self, identity: Identity, admission_id: str, token_estimate: int) -> Admission:
        type(self).calls += 1
        raise self.error


@pytest.mark.parametrize("mode", ["open", "closed"])
# A store client dying mid-call may raise what it never documented (an asyncio transport's RuntimeError):
# it is an outage all the same, never a 500.
@pytest.mark.parametrize("error", [StoreError("down"), RuntimeError("unable to perform operation on <TCPTransport closed=True>")])
async def test_store_outage_answers_at_once_and_retries_after_a_pause(tmp_path: Path, mode: str, error: Exception) -> None:
    config = UsersConfig(enabled=True, on_store_error=mode, store_retry_s=60)
    subject = Limiter(config, _BrokenStore(tmp_path / "users.sqlite3"))
    _BrokenStore.calls, _BrokenStore.error = 0, error
    for _ in range(5):
        if mode == "open":
            assert await subject.admit(Identity("user", "erin"), 1) is None
        else:
            with pytest.raises(GatewayError, match="rate limits cannot be checked") as error:
                await subject.admit(Identity("user", "erin"), 1)
            assert error.value.status == 503
    assert _BrokenStore.calls == 1  # the store is left alone for store_retry_s after a failure


async def test_closed_limits_answer_503_while_redis_is_gone_and_recover(redis_server: RedisServer) -> None:
    """``on_store_error: closed`` against a killed Redis: a 503 at once, then limits again."""
    config = UsersConfig(enabled=True, on_store_error="closed", store_retry_s=0.2)
    subject = Limiter(config, RedisUserStore(redis_server.url, timeout_s=0.25))
    await subject.store.create_user(User(name="frank", rpm=2))
    assert await subject.admit(Identity("user", "frank"), 1) is not None
    redis_server.kill()
    try:
        for _ in range(3):
            with pytest.raises(GatewayError, match="rate limits cannot be checked") as error:
                await subject.admit(Identity("user", "frank"), 1)
            assert error.value.status == 503 and dict(error.value.headers)[b"retry-after"] == b"1"
    finally:
        redis_server.start()
    await asyncio.sleep(0.3)  # past store_retry_s: the next request tries Redis again
    assert await subject.admit(Identity("user", "frank"), 1) is not None  # 2nd of rpm=2 (kept in the AOF)
    with pytest.raises(GatewayError, match="exceeded RPM: 2"):
        await subject.admit(Identity("user", "frank"), 1)
    await subject.store.close()
