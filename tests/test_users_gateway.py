"""Users and limits through the live gateway: real Ray, Serve, simulator engines and Redis.

Counts are exact here because admission is one atomic step in Redis: a thousand concurrent
requests for a user with rpm=100 get exactly 100 answers and 900 429s, however the gateway
replicas interleave them.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from rayfleet.protocol.users import key_digest
from tests.conftest import MODEL, deploy_app, pool_config
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.timeout(600)

ADMIN = "test-admin-token-0123"


def users_config(redis_url: str, **users: object) -> dict:
    config = pool_config(replicas=2, gpu="instant", num_replicas=2)
    # Only the token's digest, as `rayfleet up` deploys it: the Serve config is on show in the dashboard.
    config["users"] = {"enabled": True, "store": redis_url, "admin_token_sha256": key_digest(ADMIN), **users}
    return config


@pytest.fixture(scope="module")
def gateway(gateway_port: int, redis_server: RedisServer) -> Iterator[str]:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    yield deploy_app(users_config(redis_server.url), gateway_port, expected_ready=2)


def call(url: str, method: str = "POST", body: object = None, token: str | None = ADMIN,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:  # fmt: skip
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, reply_headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, reply_headers, payload = error.code, dict(error.headers), error.read()
    return status, {k.lower(): v for k, v in reply_headers.items()}, json.loads(payload) if payload else None


def completion(max_tokens: int = 4) -> dict:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True}


def create_user(gateway: str, name: str, rpm: int = 0, tpm: int = 0) -> None:
    status, _, body = call(f"{gateway}/v1/users", body={"name": name, "rpm": rpm, "tpm": tpm})
    assert status == 201, body


# -- the user API -------------------------------------------------------------------------


def test_aibrix_user_api_round_trip(gateway: str) -> None:
    status, _, body = call(f"{gateway}/CreateUser", body={"name": "aibrix-user", "rpm": 10, "tpm": 1000})
    assert (status, body) == (200, {"message": "Created User: aibrix-user", "user": {"name": "aibrix-user", "rpm": 10, "tpm": 1000}})
    status, _, body = call(f"{gateway}/CreateUser", body={"name": "aibrix-user", "rpm": 99})
    assert (status, body) == (200, {"message": "User: aibrix-user exists", "user": {"name": "aibrix-user", "rpm": 99}})
    assert call(f"{gateway}/ReadUser", body={"name": "aibrix-user"})[2]["user"]["rpm"] == 10
    status, _, body = call(f"{gateway}/UpdateUser", body={"name": "aibrix-user", "rpm": 20, "tpm": 0})
    assert (status, body["message"], body["user"]["rpm"]) == (200, "Updated User: aibrix-user", 20)
    assert call(f"{gateway}/DeleteUser", body={"name": "aibrix-user"})[2]["message"] == "Deleted User: aibrix-user"
    assert call(f"{gateway}/ReadUser", body={"name": "aibrix-user"})[:3:2] == (404, {"detail": "user does not exist"})
    assert call(f"{gateway}/UpdateUser", body={"name": "aibrix-user"})[:3:2] == (
        404, {"detail": "User: aibrix-user does not exist"})  # fmt: skip
    assert call(f"{gateway}/DeleteUser", body={"name": "aibrix-user"})[0] == 404


def test_rest_user_api_and_keys(gateway: str) -> None:
    create_user(gateway, "rest-user", rpm=5)
    assert call(f"{gateway}/v1/users", body={"name": "rest-user"})[0] == 409
    status, _, body = call(f"{gateway}/v1/users/rest-user", "GET")
    assert status == 200 and body["usage"] == {"requests": 0, "tokens": 0, "rpm_limit": 5, "tpm_limit": 5000}
    assert call(f"{gateway}/v1/users/rest-user", "PATCH", {"tpm": 77})[2] == {"name": "rest-user", "rpm": 5, "tpm": 77}
    assert call(f"{gateway}/v1/users/rest-user", "PUT", {"rpm": 6})[2] == {"name": "rest-user", "rpm": 6, "tpm": 0}
    assert "rest-user" in [u["name"] for u in call(f"{gateway}/v1/users", "GET")[2]["data"]]
    status, _, issued = call(f"{gateway}/v1/users/rest-user/keys")
    assert status == 201 and issued["key"].startswith("rf-")
    assert [k["id"] for k in call(f"{gateway}/v1/users/rest-user/keys", "GET")[2]["data"]] == [issued["id"]]
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=issued["key"], max_retries=0)
    response = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
    assert response.headers["x-ratelimit-limit-requests"] == "6"
    assert response.headers["x-ratelimit-remaining-requests"] == "5"
    assert call(f"{gateway}/v1/users/rest-user/keys/{issued['id']}", "DELETE")[0] == 200
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert call(f"{gateway}/v1/users/rest-user", "DELETE")[0] == 200
    assert call(f"{gateway}/v1/users/rest-user", "GET")[0] == 404


@pytest.mark.parametrize(
    ("path", "method", "raw", "status", "fragment"),
    [
        ("/v1/users", "POST", b'{"name": "neg", "rpm": -1}', 400, "greater than or equal to 0"),
        ("/v1/users", "POST", b'{"name": "huge", "tpm": 10000000000000000}', 400, "less than or equal"),
        ("/v1/users", "POST", b'{"rpm": 5}', 400, "name: Field required"),
        ("/v1/users", "POST", b'{"name": "typed", "rpm": "5"}', 400, "valid integer"),
        ("/v1/users", "POST", b'{"name": "bad name!"}', 400, "pattern"),
        ("/v1/users", "POST", b"not json", 400, "JSON"),
        ("/v1/users", "POST", b'{"name": "x", "extra": 1}', 400, "Extra inputs"),
        ("/CreateUser", "POST", b'{"name": "neg", "rpm": -1}', 422, "greater than or equal to 0"),
        ("/CreateUser", "POST", b"[1, 2", 422, "json"),
        ("/ReadUser", "POST", b"{}", 422, "Field required"),
        ("/CreateUser", "GET", b"", 405, "Method Not Allowed"),
        ("/v1/users/nobody", "GET", b"", 404, "does not exist"),
        ("/v1/users/nobody/keys", "POST", b"", 404, "does not exist"),
    ],
)
def test_bad_user_requests_are_4xx_and_store_nothing(
    gateway: str, path: str, method: str, raw: bytes, status: int, fragment: str
) -> None:
    before = call(f"{gateway}/v1/users", "GET")[2]["data"]
    got, _, body = call(f"{gateway}{path}", method, raw=raw)
    assert got == status and fragment in json.dumps(body)
    assert call(f"{gateway}/v1/users", "GET")[2]["data"] == before


def test_admin_token_is_required(gateway: str) -> None:
    assert call(f"{gateway}/v1/users", "GET", token=None)[0] == 401
    status, _, body = call(f"{gateway}/v1/users", "GET", token="wrong-token")
    assert status == 401 and body["error"]["code"] == "invalid_admin_token"
    assert call(f"{gateway}/CreateUser", body={"name": "sneaky"}, token="wrong-token")[0] == 401
    assert call(f"{gateway}/v1/users/sneaky", "GET")[0] == 404


# -- identities -----------------------------------------------------------------------------


def test_identity_rules(gateway: str) -> None:
    anonymous = openai.OpenAI(base_url=f"{gateway}/v1", api_key="EMPTY", max_retries=0)
    assert anonymous.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices  # allowed, unlimited
    with pytest.raises(openai.AuthenticationError, match="user: ghost does not exist") as error:
        anonymous.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_headers={"user": "ghost"})
    assert error.value.body["code"] == "unknown_user"
    with pytest.raises(openai.AuthenticationError, match="API key is not valid"):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="rf-forged", max_retries=0).completions.create(
            model=MODEL, prompt="hi", max_tokens=2
        )


# -- limits -----------------------------------------------------------------------------------


async def _burst(gateway: str, headers: dict[str, str], count: int, body: dict) -> list[tuple[int, dict[str, str], dict]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count)) as session:

        async def one() -> tuple[int, dict[str, str], dict]:
            async with session.post(f"{gateway}/v1/completions", json=body, headers=headers) as response:
                text = await response.read()
                payload = json.loads(text)
                return response.status, {k.lower(): v for k, v in response.headers.items()}, payload

        return await asyncio.gather(*(one() for _ in range(count)))


def test_a_thousand_concurrent_requests_admit_exactly_rpm(gateway: str) -> None:
    """Two gateway replicas, one budget: exactly 100 of 1,000 concurrent requests get through."""
    create_user(gateway, "burst", rpm=100, tpm=10**9)
    results = asyncio.run(_burst(gateway, {"user": "burst"}, 1000, completion(max_tokens=1)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 100 and statuses.count(429) == 900, sorted(set(statuses))
    status, headers, body = next(r for r in results if r[0] == 429)
    assert body["error"] == {"message": "user: burst has exceeded RPM: 100", "type": "rate_limit_error",
                             "param": None, "code": "rate_limit_exceeded"}  # fmt: skip
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "100" and headers["x-error-rpm-exceeded"] == "true"
    assert call(f"{gateway}/v1/users/burst", "GET")[2]["usage"]["requests"] == 100


def test_tpm_charges_exact_tokens_for_streamed_and_plain_responses(gateway: str) -> None:
    """Each answer is charged its prompt + completion tokens exactly, streams without a usage
    event included; once the window's charges reach tpm, the next request is refused."""
    create_user(gateway, "tokens", rpm=1000, tpm=10**6)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="EMPTY", max_retries=0, default_headers={"user": "tokens"})
    plain = client.completions.create(model=MODEL, prompt="count my tokens please", max_tokens=7, extra_body={"ignore_eos": True})
    with_usage = list(client.completions.create(model=MODEL, prompt="and these too", max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))  # fmt: skip
    without_usage = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=6, stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    chat_tokens = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                                 extra_body={"ignore_eos": True}).usage.total_tokens  # fmt: skip
    assert sum(c.choices[0].delta.content is not None for c in without_usage if c.choices) >= 6
    expected = plain.usage.total_tokens + with_usage[-1].usage.total_tokens + 2 * chat_tokens
    assert call(f"{gateway}/v1/users/tokens", "GET")[2]["usage"]["tokens"] == expected
    # Lower the limit to what was spent: the next request is refused with the TPM message.
    call(f"{gateway}/v1/users/tokens", "PATCH", {"tpm": expected})
    with pytest.raises(openai.RateLimitError, match=f"user: tokens has exceeded TPM: {expected}") as refused:
        client.completions.create(model=MODEL, prompt="one more", max_tokens=1)
    assert refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_concurrent_requests_cannot_overrun_tpm(gateway: str) -> None:
    """Reservations make in-flight requests visible: 200 concurrent requests of ~40 tokens
    against tpm=1000 spend at most the limit plus one request."""
    create_user(gateway, "reserve", rpm=1000, tpm=1000)
    results = asyncio.run(_burst(gateway, {"user": "reserve"}, 200, completion(max_tokens=8)))
    spent = [body["usage"]["total_tokens"] for status, _, body in results if status == 200]
    assert 0 < len(spent) < 200 and {s for s, _, _ in results} == {200, 429}
    charged = call(f"{gateway}/v1/users/reserve", "GET")[2]["usage"]["tokens"]
    assert charged == sum(spent) and charged < 1000 + max(spent)


def _serve_replicas(deployment: str) -> list:
    """Handles of the live Serve replica actors of one of our deployments."""
    import ray

    prefix = f"SERVE_REPLICA::rayfleet#{deployment}#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named if a["name"].startswith(prefix)]


def test_users_survive_a_gateway_restart(gateway: str) -> None:
    """Every gateway and user-service replica killed: Serve starts new ones, which find the
    users and keys where they were (in Redis) and enforce the same budget."""
    import ray

    create_user(gateway, "survivor", rpm=3)
    key = call(f"{gateway}/v1/users/survivor/keys")[2]["key"]
    assert call(f"{gateway}/v1/completions", body=completion(), token=key)[0] == 200
    replicas = _serve_replicas("Gateway") + _serve_replicas("UserService")
    assert len(replicas) == 3
    for replica in replicas:
        ray.kill(replica, no_restart=False)
    deadline = time.monotonic() + 60
    status = 0
    while time.monotonic() < deadline and status != 200:
        time.sleep(0.5)
        try:
            status = call(f"{gateway}/v1/users/survivor", "GET")[0]
        except (OSError, ValueError):  # no replica yet: refused, or HAProxy's own error page
            status = 0
    assert status == 200
    answers = [call(f"{gateway}/v1/completions", body=completion(), token=key) for _ in range(3)]
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 429], answers  # one of the 3 per minute was spent before the restart


def test_redis_outage_never_hangs_and_limits_resume(gateway: str, redis_server: RedisServer) -> None:
    """Redis killed mid-load: with the default ``on_store_error: open`` every request is
    served (unchecked) and none hangs; once Redis is back, limits apply again by themselves.
    (The ``closed`` answer, a 503, is checked against a dead Redis in tests/test_limiter.py.)"""
    name = "outage"
    create_user(gateway, name, rpm=5, tpm=10**6)
    spent = [call(f"{gateway}/v1/completions", body=completion(), token=None, headers={"user": name})[0] for _ in range(5)]
    assert spent == [200] * 5  # the minute's budget is used up before Redis goes

    async def load_through_the_kill() -> list[tuple[int, dict[str, str], dict]]:
        burst = asyncio.ensure_future(_burst(gateway, {"user": name}, 60, completion(max_tokens=1)))
        await asyncio.sleep(0.05)
        redis_server.kill()
        return await burst

    try:
        started = time.monotonic()
        results = asyncio.run(load_through_the_kill())
        assert time.monotonic() - started < 30  # no request hangs (each store call is bounded by 0.25 s)
        assert {status for status, _, _ in results} <= {200, 429}  # refused while Redis lived, then served
        after = [status for status, _, _ in asyncio.run(_burst(gateway, {"user": name}, 20, completion(max_tokens=1)))]
        assert after == [200] * 20  # Redis down: served without limits
    finally:
        redis_server.start()
    # Recovers by itself after the retry period: the window (kept in Redis's append-only
    # file) still holds the admissions made before the kill, so the limit applies at once.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        statuses = [status for status, _, _ in asyncio.run(_burst(gateway, {"user": name}, 8, completion(max_tokens=1)))]
        if 429 in statuses and 200 not in statuses:
            break
        time.sleep(0.5)
    assert statuses == [429] * 8
