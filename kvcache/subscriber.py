"""One engine's KV events into the index shards: ``KVEventSubscriber``, a Ray actor per endpoint.

It reads the engine's ZMQ stream (``rayfleet.protocol.kv_events``) in batch-sequence
order and keeps a *mirror*: the (block hash, medium) pairs the engine currently caches,
as far as the events said. Everything it tells the shards follows from the mirror, so
the index never holds a block for this endpoint that the mirror does not:

- a gap in the batch sequence is filled from the engine's replay socket; when it cannot
  be (no replay socket, buffer rolled over, no answer) the subscriber resyncs: it
  clears the mirror and the endpoint's entries everywhere and carries on from the live
  stream. Lost events may have removed blocks, so forgetting is the only safe answer;
- a shard that lost the endpoint (it restarted, or the ops arrived too far out of
  order) answers an op with False, and gets the mirror's part for that shard as a
  replace. A periodic empty op catches a restarted shard while the engine is idle;
- ops go out batched per shard and pipelined: replies are awaited by background tasks,
  never in the read loop, with a bound on calls in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

import ray
import zmq
import zmq.asyncio
from pydantic import BaseModel
from ray.actor import ActorHandle
from ray.exceptions import RayError

from kvcache.index import DEFAULT_MEDIUM, BlockOp, BlockOpKind
from kvcache.shard import shard_of
from rayfleet.protocol.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    decode_seq,
    encode_seq,
)

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256  # shard calls awaiting their reply before the read loop waits
MAX_DRAIN = 256  # queued ZMQ messages folded into one round of shard calls
_CLEARED = BlockOp(BlockOpKind.CLEARED)


class SubscriberStatus(BaseModel):
    endpoint: str
    last_seq: int | None  # last engine batch applied
    batches_applied: int
    gaps: int  # holes seen in the live stream
    replays: int
    resyncs: int
    replaces_sent: int
    mirror_blocks: int
    in_flight: int


@ray.remote(num_cpus=0, max_restarts=-1)
class KVEventSubscriber:
    """Follows one engine's KV events and keeps its entries in every index shard exact.

    A restarted subscriber comes back as a new feed with an empty mirror: its first act
    (a replace per shard) claims the endpoint and wipes what its previous life left, and
    it catches up from the engine's replay buffer. ``stop()`` before killing it removes
    the endpoint from the index.
    """

    def __init__(
        self,
        endpoint: str,
        events_endpoint: str,
        replay_endpoint: str | None,
        shards: list[ActorHandle],
        topic: str = "",
        max_mirror_blocks: int = 1_000_000,
        heartbeat_s: float = 1.0,
        replay_timeout_s: float = 2.0,
    ) -> None:
        """``events_endpoint``/``replay_endpoint`` are connect addresses (``tcp://host:port``).

        ``max_mirror_blocks`` should be at least the engine's cache size in blocks (GPU plus
        offload tiers): past it the oldest blocks are dropped from the mirror and the index,
        which only matters if the events stopped reporting evictions.
        """
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._shards = list(shards)
        self._max_mirror_blocks = max_mirror_blocks
        self._heartbeat_s = heartbeat_s
        self._replay_timeout_s = replay_timeout_s
        self._feed = uuid.uuid4().hex
        num_shards = len(self._shards)
        # (block hash, medium) -> owning shard; insertion order is store order.
        self._mirror: dict[tuple[int, str], int] = {}
        self._outbox: list[list[BlockOp]] = [[] for _ in range(num_shards)]
        self._next_seq = [0] * num_shards
        self._replaced_at = [-1] * num_shards  # seq of the last replace the shard accepted
        self._replacing = [False] * num_shards
        self._dirty = [False] * num_shards  # a call failed: replace at the next heartbeat
        self._calls: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._last_seq: int | None = None
        self._last_live_seq: int | None = None
        self._batches_applied = self._gaps = self._replays = self._resyncs = self._replaces_sent = 0
        self._context = zmq.asyncio.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(events_endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        for shard in range(num_shards):
            self._request_replace(shard)
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._heartbeat_loop())]
        for task in self._tasks:
            task.add_done_callback(self._on_loop_exit)

    async def status(self) -> SubscriberStatus:
        return SubscriberStatus(
            endpoint=self._endpoint,
            last_seq=self._last_seq,
            batches_applied=self._batches_applied,
            gaps=self._gaps,
            replays=self._replays,
            resyncs=self._resyncs,
            replaces_sent=self._replaces_sent,
            mirror_blocks=len(self._mirror),
            in_flight=len(self._calls),
        )

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reading, let sent ops land, then drop the endpoint from every shard.

        The drop waits for the calls in flight because an async actor may run a caller's
        calls out of order; the shard also refuses this feed once it dropped it, so a call
        that outlives ``timeout_s`` cannot re-add the endpoint either.
        """
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._calls:
            await asyncio.wait(self._calls, timeout=timeout_s)
        await asyncio.gather(
            *(shard.drop_endpoint.remote(self._endpoint) for shard in self._shards), return_exceptions=True
        )
        self._mirror.clear()
        self._sub.close()
        self._context.term()

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        """A loop that died outside ``stop()`` would leave the endpoint's entries to go stale
        (the engine keeps evicting): crash, so Ray restarts the subscriber as a new feed."""
        if self._stopping or task.cancelled():
            return
        logger.error("%s: subscriber loop died; restarting the actor", self._endpoint, exc_info=task.exception())
        os._exit(1)

    # -- reading the engine -------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            await self._on_live(frames)
            for _ in range(MAX_DRAIN):
                try:
                    frames = await self._sub.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                await self._on_live(frames)
            await self._flush()

    async def _on_live(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 3:
                raise ValueError(f"expected [topic, seq, payload], got {len(frames)} frames")
            seq = decode_seq(frames[1])
            if self._last_live_seq is not None and seq <= self._last_live_seq:
                # The live stream only goes forward within one publisher: the engine restarted.
                self._resync(f"live sequence went back from {self._last_live_seq} to {seq}")
            self._last_live_seq = seq
            if self._last_seq is not None and seq <= self._last_seq:
                return  # already applied from a replay
            expected = 0 if self._last_seq is None else self._last_seq + 1
            if seq != expected:
                if self._last_seq is not None:
                    self._gaps += 1
                if self._replay_endpoint is not None:
                    await self._replay(expected)
            self._apply_in_order(seq, frames[2])
        except Exception:
            # Whatever the batch held is lost, and it may have removed blocks.
            logger.exception("%s: bad KV event message", self._endpoint)
            self._resync("unreadable message")

    async def _replay(self, start_seq: int) -> None:
        """Apply the engine's buffered batches from ``start_seq`` on, as far as it has them."""
        assert self._replay_endpoint is not None
        self._replays += 1
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._replay_endpoint)
        try:
            await dealer.send_multipart([b"", encode_seq(start_seq)])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self._replay_timeout_s)
                if len(frames) != 3:
                    raise ValueError(f"expected [b'', seq, payload], got {len(frames)} frames")
                seq = decode_seq(frames[1])
                if seq == END_OF_REPLAY:
                    return
                self._apply_in_order(seq, frames[2])
                if sum(map(len, self._outbox)) >= MAX_DRAIN:
                    await self._flush()
        except (TimeoutError, ValueError) as exc:
            logger.warning("%s: replay from %d failed: %s", self._endpoint, start_seq, exc)
        finally:
            dealer.close()

    def _apply_in_order(self, seq: int, payload: bytes) -> None:
        """Apply batch ``seq`` unless already applied; a hole before it forces a resync."""
        if self._last_seq is not None and seq <= self._last_seq:
            return
        batch = decode_batch(payload)  # before anything moves: a bad payload leaves the hole open
        if self._last_seq is not None and seq != self._last_seq + 1:
            self._resync(f"batches {self._last_seq + 1}..{seq - 1} are lost")
        self._last_seq = seq
        self._batches_applied += 1
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(event.block_hashes, event.medium or DEFAULT_MEDIUM)
            elif isinstance(event, BlockRemoved):
                self._removed(event.block_hashes, event.medium or DEFAULT_MEDIUM)
            elif isinstance(event, AllBlocksCleared):
                self._clear()

    # -- mirror -> ops --------------------------------------------------------------------

    def _stored(self, hashes: list[int], medium: str) -> None:
        num_shards = len(self._shards)
        mirror = self._mirror
        by_shard: defaultdict[int, list[int]] = defaultdict(list)
        for block_hash in reversed(hashes):  # tail first: the chain's head is the newest, as in the index
            key = (block_hash, medium)
            shard = mirror.pop(key, None)
            if shard is None:
                shard = shard_of(block_hash, num_shards)
            mirror[key] = shard
            by_shard[shard].append(block_hash)
        for shard, shard_hashes in by_shard.items():
            shard_hashes.reverse()  # ops carry chain order
            self._outbox[shard].append(BlockOp(BlockOpKind.STORED, shard_hashes, medium))
        excess = len(mirror) - self._max_mirror_blocks
        if excess > 0:
            evicted: defaultdict[tuple[int, str], list[int]] = defaultdict(list)
            for key in [key for key, _ in zip(mirror, range(excess))]:
                evicted[mirror.pop(key), key[1]].append(key[0])
            for (shard, old_medium), shard_hashes in evicted.items():
                self._outbox[shard].append(BlockOp(BlockOpKind.REMOVED, shard_hashes, old_medium))

    def _removed(self, hashes: list[int], medium: str) -> None:
        by_shard: defaultdict[int, list[int]] = defaultdict(list)
        for block_hash in hashes:
            shard = self._mirror.pop((block_hash, medium), None)
            if shard is not None:  # a block the index never got needs no removal
                by_shard[shard].append(block_hash)
        for shard, shard_hashes in by_shard.items():
            self._outbox[shard].append(BlockOp(BlockOpKind.REMOVED, shard_hashes, medium))

    def _clear(self) -> None:
        """Forget every block: earlier queued ops are moot, one CLEARED per shard replaces them."""
        self._mirror.clear()
        for outbox in self._outbox:
            outbox[:] = [_CLEARED]

    def _resync(self, reason: str) -> None:
        logger.warning("%s: resync (%s): dropping the endpoint's index entries", self._endpoint, reason)
        self._resyncs += 1
        self._clear()
        self._last_seq = None

    # -- shard calls ------------------------------------------------------------------------

    async def _flush(self) -> None:
        for shard, ops in enumerate(self._outbox):
            if ops:
                self._outbox[shard] = []
                self._send_ops(shard, ops)
        while len(self._calls) >= MAX_IN_FLIGHT:
            await asyncio.wait(self._calls, return_when=asyncio.FIRST_COMPLETED)

    def _send_ops(self, shard: int, ops: list[BlockOp]) -> None:
        if self._stopping:
            return
        seq = self._take_seq(shard)
        ref = self._shards[shard].apply.remote(self._endpoint, self._feed, seq, ops)
        self._track(self._settle_ops(shard, seq, ref))

    async def _settle_ops(self, shard: int, seq: int, ref: ray.ObjectRef) -> None:
        try:
            in_sync = await ref
        except RayError as exc:
            logger.warning("%s: shard %d missed ops %d: %s", self._endpoint, shard, seq, exc)
            self._dirty[shard] = True
            return
        if not in_sync and seq > self._replaced_at[shard]:
            self._request_replace(shard)

    def _request_replace(self, shard: int) -> None:
        """Send the mirror's part for ``shard`` as its whole content, one replace at a time.

        The mirror already includes the effect of ops still queued in the outbox; they are
        sent after the replace and reapplying them changes nothing.
        """
        if self._replacing[shard] or self._stopping:
            return
        self._replacing[shard] = True
        self._dirty[shard] = False
        by_medium: defaultdict[str, list[int]] = defaultdict(list)
        for (block_hash, medium), owner in reversed(self._mirror.items()):
            if owner == shard:
                by_medium[medium].append(block_hash)  # newest first, like a chain: it stays the newest
        ops = [BlockOp(BlockOpKind.STORED, hashes, medium) for medium, hashes in by_medium.items()]
        seq = self._take_seq(shard)
        self._replaces_sent += 1
        ref = self._shards[shard].replace.remote(self._endpoint, self._feed, seq, ops)
        self._track(self._settle_replace(shard, seq, ref))

    async def _settle_replace(self, shard: int, seq: int, ref: ray.ObjectRef) -> None:
        try:
            accepted = await ref
        except RayError as exc:
            logger.warning("%s: replace on shard %d failed: %s", self._endpoint, shard, exc)
            self._replacing[shard] = False
            self._dirty[shard] = True  # retried at the next heartbeat, not in a tight loop
            return
        self._replacing[shard] = False
        if accepted:
            self._replaced_at[shard] = max(self._replaced_at[shard], seq)
        else:
            # The shard lost ops sent after this one (or dropped the endpoint): a newer view,
            # at the heartbeat's pace so a shard that keeps refusing is not flooded.
            self._dirty[shard] = True

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            for shard in range(len(self._shards)):
                if self._dirty[shard]:
                    self._request_replace(shard)
                else:
                    self._send_ops(shard, [])

    def _take_seq(self, shard: int) -> int:
        seq = self._next_seq[shard]
        self._next_seq[shard] = seq + 1
        return seq

    def _track(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(call)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
