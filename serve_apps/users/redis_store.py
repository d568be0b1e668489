"""The production store: Redis, shared by every gateway replica, through ``redis-py`` asyncio.

Layout (all under ``rayfleet:``):

- ``user:<name>``: hash ``rpm``, ``tpm``; ``users``: set of names.
- ``key:<sha256>``: the user a key belongs to; ``user:<name>:keys``: hash key id -> digest
  and ``user:<name>:keyinfo``: hash key id -> created time.
- ``rl:<name>:req``: sorted set of admissions (score: admission time, ms);
  ``rl:<name>:tok``: sorted set of charges and reservations (score: time, ms) with their
  amounts in the member names (``<admission id>:<tokens>``) and their running sum in
  ``rl:<name>:sum``.

Admission and settlement are Lua scripts timed by Redis's own clock (``TIME``), so
replicas with skewed clocks still share one window. The admission script resolves an API
key to its user itself, which keeps admission to one round trip but names keys the caller
did not declare: it needs a standalone Redis (or one primary), not Redis Cluster.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rayfleet.protocol.users import ApiKeyInfo, User, WindowUsage
from serve_apps.users.redis_batch import LuaScript, ScriptBatcher
from serve_apps.users.store import (
    DEFAULT_RPM,
    DEFAULT_TPM_PER_RPM,
    WINDOW_S,
    Admission,
    Identity,
    StoreError,
)

_PREFIX = "rayfleet:"
MAX_CONNECTIONS = 64
POOL_WAIT_S = 10.0

# Shared by the scripts: the clock, key names, and trimming the token log to the window.
# Token log members are "<admission id>:<tokens>", so trimming needs no second structure.
_LUA_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local function keys_of(name)
  local base = 'rayfleet:rl:' .. name
  return base .. ':req', base .. ':tok', base .. ':sum'
end
local function trim_tokens(tok, sum, since)
  local expired = redis.call('ZRANGEBYSCORE', tok, '-inf', since)
  if #expired == 0 then return end
  local total = 0
  for _, member in ipairs(expired) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', since)
  redis.call('DECRBY', sum, total)
end
local function oldest(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end
"""

# ARGV: window_ms, kind ('user'|'key'), who, default rpm, tpm per rpm, then per admission
# (in the order they are decided): its id and its token estimate. One reply per admission:
# {verdict, user, rpm, requests, requests reset ms, tpm, tokens, tokens reset ms}.
_ADMIT = LuaScript(_LUA_COMMON + """
local count = (#ARGV - 5) / 2
local function each(reply)
  local replies = {}
  for i = 1, count do replies[i] = reply end
  return replies
end
local name = ARGV[3]
if ARGV[2] == 'key' then
  name = redis.call('GET', 'rayfleet:key:' .. ARGV[3])
  if not name then return each({'unknown_key', ''}) end
end
local limits = redis.call('HMGET', 'rayfleet:user:' .. name, 'rpm', 'tpm')
if not limits[1] then return each({'unknown_user', name}) end
local rpm = tonumber(limits[1]); if rpm == 0 then rpm = tonumber(ARGV[4]) end
local tpm = tonumber(limits[2]); if tpm == 0 then tpm = rpm * tonumber(ARGV[5]) end
local req, tok, sum = keys_of(name)
local since = now - window
redis.call('ZREMRANGEBYSCORE', req, '-inf', since)
trim_tokens(tok, sum, since)
local requests = redis.call('ZCARD', req)
local tokens = tonumber(redis.call('GET', sum) or '0')
local oldest_req, oldest_tok = oldest(req), oldest(tok)
local replies, req_adds, tok_adds, added = {}, {}, {}, 0
for i = 1, count do
  local id, estimate = ARGV[4 + 2 * i], tonumber(ARGV[5 + 2 * i])
  if requests >= rpm then
    replies[i] = {'rpm', name, rpm, requests, oldest_req + window - now, tpm, tokens, (oldest_tok or now) + window - now}
  elseif tokens >= tpm then
    replies[i] = {'tpm', name, rpm, requests, (oldest_req or now) + window - now, tpm, tokens, oldest_tok + window - now}
  else
    requests, tokens, added = requests + 1, tokens + estimate, added + estimate
    oldest_req, oldest_tok = oldest_req or now, oldest_tok or now
    req_adds[#req_adds + 1] = now; req_adds[#req_adds + 1] = id
    tok_adds[#tok_adds + 1] = now; tok_adds[#tok_adds + 1] = id .. ':' .. estimate
    replies[i] = {'admitted', name, rpm, requests, oldest_req + window - now, tpm, tokens, oldest_tok + window - now}
  end
end
if #req_adds > 0 then
  redis.call('ZADD', req, unpack(req_adds))
  redis.call('ZADD', tok, unpack(tok_adds))
  redis.call('INCRBY', sum, added)
  redis.call('PEXPIRE', req, 2 * window)
  redis.call('PEXPIRE', tok, 2 * window)
  redis.call('PEXPIRE', sum, 2 * window)
end
return replies
""")

# ARGV: window_ms, user, then per charge: admission id, tokens used, tokens reserved.
# A reservation may have left the window already (a request longer than the window): then
# it was subtracted when it expired, and the charge counts in full.
_SETTLE = LuaScript(_LUA_COMMON + """
local req, tok, sum = keys_of(ARGV[2])
local reservations, adds = {}, {}
for i = 3, #ARGV, 3 do
  reservations[#reservations + 1] = ARGV[i] .. ':' .. ARGV[i + 2]
  adds[#adds + 1] = now; adds[#adds + 1] = ARGV[i] .. ':' .. ARGV[i + 1]
end
local held = redis.call('ZMSCORE', tok, unpack(reservations))
local delta, replies = 0, {}
for n = 1, #reservations do
  delta = delta + tonumber(ARGV[3 * n + 1])
  if held[n] then delta = delta - tonumber(ARGV[3 * n + 2]) end
  replies[n] = 1
end
redis.call('ZREM', tok, unpack(reservations))
redis.call('ZADD', tok, unpack(adds))
redis.call('INCRBY', sum, delta)
redis.call('PEXPIRE', tok, 2 * window)
redis.call('PEXPIRE', sum, 2 * window)
return replies
""")

# KEYS: user hash, set of names; ARGV: name, rpm, tpm, mode ('create'|'update')
_WRITE_USER = LuaScript("""
local exists = redis.call('EXISTS', KEYS[1]) == 1
if (ARGV[4] == 'create') == exists then return 0 end
redis.call('HSET', KEYS[1], 'rpm', ARGV[2], 'tpm', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
""")

# ARGV: window_ms, user
_USAGE = LuaScript(_LUA_COMMON + """
local req, tok, sum = keys_of(ARGV[2])
local since = now - window
redis.call('ZREMRANGEBYSCORE', req, '-inf', since)
trim_tokens(tok, sum, since)
return {redis.call('ZCARD', req), tonumber(redis.call('GET', sum) or '0')}
""")


class _HiredisPackingConnection(aioredis.Connection):
    """redis-py's asyncio connection packs commands in Python (~6 us for an admission's
    ten arguments); hiredis, which parses the replies already, packs them in C (~1 us)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], (str, bytes)) and (" " in args[0] if isinstance(args[0], str) else b" " in args[0]):
            args = (*args[0].split(), *args[1:])  # "SCRIPT LOAD" is two words on the wire, as redis-py sends it
        return [hiredis.pack_command(args)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisUserStore:
    """``UserStore`` on Redis. Every call is bounded by ``timeout_s``; failures raise ``StoreError``."""

    def __init__(self, url: str, timeout_s: float = 0.25, window_s: float = WINDOW_S) -> None:
        self.url = url
        self._window_ms = int(window_s * 1000)
        # A bounded pool: a burst of a thousand admissions shares MAX_CONNECTIONS connections
        # (each admission holds one for well under a millisecond) instead of opening a
        # thousand. The socket timeout bounds an unresponsive Redis; the pool wait is longer
        # because queueing behind a burst is normal.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
            connection_class=_HiredisPackingConnection,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._scripts = ScriptBatcher(self._redis)

    async def _call(self, coroutine: Any) -> Any:
        try:
            return await coroutine
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis at {self.url}: {exc}") from None

    # -- users -------------------------------------------------------------------------
    async def create_user(self, user: User) -> bool:
        return await self._write(user, "create")

    async def get_user(self, name: str) -> User | None:
        values = await self._call(self._redis.hmget(f"{_PREFIX}user:{name}", "rpm", "tpm"))
        if values[0] is None:
            return None
        return User(name=name, rpm=int(values[0]), tpm=int(values[1] or 0))

    async def update_user(self, user: User) -> bool:
        return await self._write(user, "update")

    async def _write(self, user: User, mode: str) -> bool:
        keys = [f"{_PREFIX}user:{user.name}", f"{_PREFIX}users"]
        return bool(await self._call(self._scripts.run(_WRITE_USER, keys, [user.name, user.rpm, user.tpm, mode])))

    async def delete_user(self, name: str) -> User | None:
        user = await self.get_user(name)
        if user is None:
            return None
        digests = await self._call(self._redis.hvals(f"{_PREFIX}user:{name}:keys"))
        base = f"{_PREFIX}rl:{name}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{_PREFIX}user:{name}", f"{_PREFIX}user:{name}:keys", f"{_PREFIX}user:{name}:keyinfo")
            pipe.delete(f"{base}:req", f"{base}:tok", f"{base}:sum")
            pipe.srem(f"{_PREFIX}users", name)
            for digest in digests:
                pipe.delete(f"{_PREFIX}key:{_text(digest)}")
            await self._call(pipe.execute())
        return user

    async def list_users(self) -> list[User]:
        names = sorted(_text(n) for n in await self._call(self._redis.smembers(f"{_PREFIX}users")))
        users = [await self.get_user(name) for name in names]
        return [user for user in users if user is not None]

    # -- keys --------------------------------------------------------------------------
    async def add_key(self, info: ApiKeyInfo, digest: str) -> bool:
        if await self.get_user(info.user) is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{_PREFIX}key:{digest}", info.user)
            pipe.hset(f"{_PREFIX}user:{info.user}:keys", info.id, digest)
            pipe.hset(f"{_PREFIX}user:{info.user}:keyinfo", info.id, repr(info.created))
            await self._call(pipe.execute())
        return True

    async def list_keys(self, user: str) -> list[ApiKeyInfo]:
        created = await self._call(self._redis.hgetall(f"{_PREFIX}user:{user}:keyinfo"))
        keys = [ApiKeyInfo(id=_text(k), user=user, created=float(_text(v))) for k, v in created.items()]
        return sorted(keys, key=lambda k: k.created)

    async def delete_key(self, user: str, key_id: str) -> bool:
        digest = await self._call(self._redis.hget(f"{_PREFIX}user:{user}:keys", key_id))
        if digest is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{_PREFIX}key:{_text(digest)}")
            pipe.hdel(f"{_PREFIX}user:{user}:keys", key_id).hdel(f"{_PREFIX}user:{user}:keyinfo", key_id)
            await self._call(pipe.execute())
        return True

    # -- windows -----------------------------------------------------------------------
    async def usage(self, name: str) -> WindowUsage | None:
        user = await self.get_user(name)
        if user is None:
            return None
        requests, tokens = await self._call(self._scripts.run(_USAGE, [], [self._window_ms, name]))
        rpm = user.rpm or DEFAULT_RPM
        return WindowUsage(requests=requests, tokens=tokens, rpm_limit=rpm, tpm_limit=user.tpm or rpm * DEFAULT_TPM_PER_RPM)

    async def admit(self, identity: Identity, admission_id: str, token_estimate: int) -> Admission:
        args = [self._window_ms, identity.kind, identity.value, DEFAULT_RPM, DEFAULT_TPM_PER_RPM]
        reply = await self._call(self._scripts.run_grouped(_ADMIT, identity, args, [admission_id, token_estimate]))
        verdict, user = _text(reply[0]), _text(reply[1])
        if len(reply) == 2:
            return Admission(verdict, user)  # type: ignore[arg-type]
        rpm, requests, requests_reset, tpm, tokens, tokens_reset = (int(v) for v in reply[2:])
        return Admission(verdict, user, rpm, requests, requests_reset / 1000, tpm, tokens, tokens_reset / 1000)  # type: ignore[arg-type]

    async def settle(self, user: str, admission_id: str, tokens: int, reserved: int) -> None:
        await self._call(self._scripts.run_grouped(_SETTLE, user, [self._window_ms, user], [admission_id, tokens, reserved]))

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
