"""Lua calls from concurrent requests, sent to Redis together.

Every admission and every charge is a script call. Sent one by one, each pays redis-py's
per-command machinery and Redis's per-script overhead, which on a 2-core machine halved
the gateway's throughput at 64 clients. So calls made while earlier ones are on the wire
wait for the next round trip, which carries them all; and calls of one script for one
*group* (the same user) become a single script call over all of them, which the script
decides one after the other. Each script call is atomic, so batching changes no decision:
a thousand concurrent admissions for one user are still decided in some order, exactly.
At one client nothing waits longer than before.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

MAX_ROUND_TRIPS_IN_FLIGHT = 2
MAX_GROUP = 500  # items per grouped call: Lua's unpack() takes at most ~8,000 values


class LuaScript:
    """A script's text and its SHA-1, the name Redis caches it under."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


@dataclass(slots=True)
class _Call:
    """One EVALSHA: ``args`` then every item's arguments; grouped scripts reply per item."""

    script: LuaScript
    keys: list[Any]
    args: list[Any]
    grouped: bool
    items: list[list[Any]] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)

    def command(self) -> bytes:
        flat = [value for item in self.items for value in item]
        return hiredis.pack_command(("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args, *flat))

    def resolve(self, reply: Any) -> None:
        if isinstance(reply, BaseException) or not self.grouped:
            replies = [reply] * len(self.futures)
        else:
            replies = reply
        for future, one in zip(self.futures, replies):
            if future.done():
                continue
            if isinstance(one, BaseException):
                future.set_exception(one)
            else:
                future.set_result(one)


class ScriptBatcher:
    """Run script calls in shared round trips; errors come back as the caller's exception."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: dict[Hashable, _Call] = {}
        self._in_flight = 0
        self._scheduled = False

    async def run(self, script: LuaScript, keys: list[Any], args: list[Any]) -> Any:
        """One script call of its own."""
        call = _Call(script, keys, args, grouped=False)
        self._pending[object()] = call
        return await self._enqueue(call)

    async def run_grouped(self, script: LuaScript, group: Hashable, args: list[Any], item: list[Any]) -> Any:
        """Join the pending call of ``script`` for ``group`` (same ``args``), adding ``item``;
        the script replies with one entry per item, in order."""
        key = (script.sha, group)
        call = self._pending.get(key)
        if call is None or len(call.items) >= MAX_GROUP:
            if call is not None:  # full: it goes as it is, a new call takes the next items
                self._pending[object()] = call
            call = self._pending[key] = _Call(script, [], args, grouped=True)
        call.items.append(item)
        return await self._enqueue(call)

    def _enqueue(self, call: _Call) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call.futures.append(future)
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._in_flight < MAX_ROUND_TRIPS_IN_FLIGHT and self._pending:
            # Soon, not now: calls made in this same turn of the event loop join the batch.
            self._scheduled = True
            loop.call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        calls, self._pending = list(self._pending.values()), {}
        self._in_flight += 1
        asyncio.get_running_loop().create_task(self._flush(calls))

    async def _flush(self, calls: list[_Call]) -> None:
        try:
            replies = await self._execute(calls)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # a restarted Redis has an empty script cache: load, then run those again
                for script in {calls[i].script.sha: calls[i].script for i in missing}.values():
                    await self._redis.script_load(script.text)
                for i, reply in zip(missing, await self._execute([calls[i] for i in missing])):
                    replies[i] = reply
        except Exception as exc:  # noqa: BLE001 - every caller waits on this batch: each gets the error
            replies = [exc] * len(calls)
        finally:
            self._in_flight -= 1
            self._schedule(asyncio.get_running_loop())
        for call, reply in zip(calls, replies):
            call.resolve(reply)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        """Write every call on one pooled connection, then read the replies in order.

        This is what redis-py's ``Pipeline`` does, minus its per-batch bookkeeping (command
        stacks, response callbacks), which cost more than the calls themselves. An error
        reply (NOSCRIPT, a script error) belongs to its call alone; a broken connection is
        dropped and fails the whole batch.
        """
        pool = self._redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(b"".join(call.command() for call in calls))
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
