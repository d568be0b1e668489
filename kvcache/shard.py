"""A shard of the prefix index as a Ray actor, and the delivery rules that keep it exact.

Each endpoint's subscriber (``kvcache.subscriber``) feeds every shard the ops for that
shard's hashes, numbered per (subscriber, shard). The shard applies them in that order
and refuses to guess: an op it cannot place (the shard restarted and lost the endpoint,
another subscriber incarnation took over, too many ops went missing) makes it drop the
endpoint's entries and ask for a *replace*, the subscriber's full current view of the
endpoint's blocks on this shard. Until the replace arrives the endpoint is missing from
this shard: a false negative, which only costs a cache miss, never a false positive.

``ShardCore`` holds those rules and the index, with no Ray in it; ``KVIndexShard`` is the
actor around it.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import ray
from pydantic import BaseModel

from kvcache.index import BlockIndex, BlockOp, Holder

_M64 = (1 << 64) - 1
# Ops a shard keeps while waiting for a missing earlier op from the same feed; async
# actors may run a caller's calls out of order, so a short wait is normal.
MAX_PENDING_BATCHES = 1024
# ``_Feed.next_seq`` of a dropped feed: every later op or replace from it is too old.
_CLOSED = sys.maxsize


def shard_of(block_hash: int, num_shards: int) -> int:
    """The shard that owns ``block_hash``: splitmix64's finalizer of its low 64 bits, mod n.

    Engine hashes are already uniform, but anything sequential (test chains, a weak hash
    function) would otherwise land in runs on one shard; the finalizer spreads
    consecutive integers evenly. Every writer and reader must agree on this function.
    """
    x = block_hash & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) % num_shards


class LookupReply(NamedTuple):
    """Per requested hash, a mask of holder ids; ``holders[bit]`` decodes a bit.

    A NamedTuple rather than a pydantic model: it is on every request's path and carries
    one int per block, which pickles compactly without validation.
    """

    masks: list[int]
    holders: list[Holder | None]


class ShardStats(BaseModel):
    shard: int
    incarnation: str  # changes when Ray restarts the actor
    blocks: int
    max_blocks: int
    bytes_estimate: int
    evicted: int
    endpoints: int
    batches_applied: int
    replaces: int
    lookups: int
    hashes_looked_up: int


@dataclass(slots=True)
class _Feed:
    """One endpoint's op stream as this shard has followed it."""

    feed: str  # the subscriber incarnation that owns the endpoint here
    next_seq: int  # in sync: the next op to apply; out of sync: the lowest acceptable replace
    in_sync: bool
    pending: dict[int, list[BlockOp]] = field(default_factory=dict)


class ShardCore:
    """The shard's state and delivery rules, without Ray (see the module docstring)."""

    def __init__(self, max_blocks: int) -> None:
        self.index = BlockIndex(max_blocks)
        self._feeds: dict[str, _Feed] = {}
        self.batches_applied = 0
        self.replaces = 0
        self.lookups = 0
        self.hashes_looked_up = 0

    @property
    def endpoints(self) -> int:
        """Endpoints this shard currently follows (in sync with their subscriber)."""
        return sum(state.in_sync for state in self._feeds.values())

    def apply(self, endpoint: str, feed: str, seq: int, ops: list[BlockOp], now: float) -> bool:
        """Apply op batch ``seq`` of ``feed`` for ``endpoint`` in order; False asks for a replace.

        An empty batch is the subscriber's heartbeat: it still has to fit the sequence, so
        a shard that restarted (and forgot the endpoint) says so even when no events flow.
        """
        state = self._feeds.get(endpoint)
        if state is None or state.feed != feed:
            self._lose(endpoint, feed, seq + 1)
            return False
        if seq < state.next_seq:
            return state.in_sync  # in sync: already applied or covered by a replace
        state.pending[seq] = ops  # out of sync: kept for after the replace, if newer
        if len(state.pending) > MAX_PENDING_BATCHES:
            self._lose(endpoint, feed, max(state.pending) + 1)
            return False
        if not state.in_sync:
            return False
        self._drain(endpoint, state, now)
        return True

    def replace(self, endpoint: str, feed: str, seq: int, ops: list[BlockOp], now: float) -> bool:
        """Make ``ops`` (the subscriber's view at ``seq``) the endpoint's whole content here.

        Refused (False) when older than what the shard already applied or lost from this
        feed: the subscriber then sends a newer one.
        """
        state = self._feeds.get(endpoint)
        if state is not None and state.feed == feed and seq < state.next_seq:
            return False
        self.index.drop_endpoint(endpoint)
        self.index.apply(endpoint, ops, now)
        self.replaces += 1
        pending = {s: batch for s, batch in state.pending.items() if s > seq} if state and state.feed == feed else {}
        state = self._feeds[endpoint] = _Feed(feed, seq + 1, True, pending)
        self._drain(endpoint, state, now)
        return True

    def drop_endpoint(self, endpoint: str) -> None:
        """Forget the endpoint's blocks and close its current feed.

        A call from that feed still in flight (a stopping subscriber's last ops) must not
        re-add what was dropped; a new subscriber for the endpoint comes as a new feed.
        """
        state = self._feeds.get(endpoint)
        if state is not None:
            self._feeds[endpoint] = _Feed(state.feed, _CLOSED, False)
        self.index.drop_endpoint(endpoint)

    def lookup(self, hashes: Sequence[int]) -> LookupReply:
        self.lookups += 1
        self.hashes_looked_up += len(hashes)
        return LookupReply(self.index.lookup(hashes), self.index.holders())

    def _lose(self, endpoint: str, feed: str, replace_from: int) -> None:
        """Forget the endpoint here until a replace numbered ``replace_from`` or later."""
        self.index.drop_endpoint(endpoint)
        self._feeds[endpoint] = _Feed(feed, replace_from, False)

    def _drain(self, endpoint: str, state: _Feed, now: float) -> None:
        while (ops := state.pending.pop(state.next_seq, None)) is not None:
            self.index.apply(endpoint, ops, now)
            state.next_seq += 1
            self.batches_applied += 1


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class KVIndexShard:
    """One shard of the cluster-wide prefix index.

    Ray restarts it empty after a crash (``max_restarts=-1``); the subscribers notice
    through the op sequence and re-send their views, so it rebuilds itself while the
    gateway routes on its fallback. Calls caught by the restart are retried a couple of
    times: a retried op lands on the empty shard and triggers that rebuild, and a call
    that keeps killing the shard fails rather than crash-looping it.
    """

    def __init__(self, shard: int, max_blocks: int) -> None:
        self._shard = shard
        self._incarnation = uuid.uuid4().hex
        self._core = ShardCore(max_blocks)

    async def apply(self, endpoint: str, feed: str, seq: int, ops: list[BlockOp]) -> bool:
        return self._core.apply(endpoint, feed, seq, ops, time.time())

    async def replace(self, endpoint: str, feed: str, seq: int, ops: list[BlockOp]) -> bool:
        return self._core.replace(endpoint, feed, seq, ops, time.time())

    async def lookup(self, hashes: list[int]) -> LookupReply:
        return self._core.lookup(hashes)

    async def drop_endpoint(self, endpoint: str) -> None:
        self._core.drop_endpoint(endpoint)

    async def stats(self) -> ShardStats:
        core = self._core
        return ShardStats(
            shard=self._shard,
            incarnation=self._incarnation,
            blocks=len(core.index),
            max_blocks=core.index.max_blocks,
            bytes_estimate=core.index.estimated_bytes(),
            evicted=core.index.evicted,
            endpoints=core.endpoints,
            batches_applied=core.batches_applied,
            replaces=core.replaces,
            lookups=core.lookups,
            hashes_looked_up=core.hashes_looked_up,
        )
