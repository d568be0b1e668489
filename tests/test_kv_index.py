"""The KV-event-driven prefix index: the shard data structure, the shard's delivery rules,
and the Ray actors end to end (subscriber -> shards -> client) against a stand-in engine
publisher speaking vLLM's ZMQ KV-event protocol.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

import pytest
import ray
import zmq

from kvcache.client import SHARD_NAME, KVIndexClient, ensure_index
from kvcache.index import BlockIndex, BlockOp, BlockOpKind, holders_of_mask, longest_prefix
from kvcache.shard import ShardCore, shard_of
from kvcache.subscriber import KVEventSubscriber, SubscriberStatus
from rayfleet.protocol.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    encode_batch,
    encode_seq,
)
from serve_apps.registry import NAMESPACE

pytestmark = pytest.mark.timeout(180)

NOW = 1_760_000_000.0


def chain(length: int, seed: int) -> list[int]:
    """A prompt's block hashes: random 64-bit ints, as the engine's xxh3 chain produces."""
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(length)]


def stored(hashes: list[int], medium: str = "GPU") -> BlockStored:
    return BlockStored(hashes, None, [], 16, None, medium)


def held(index: BlockIndex, hashes: list[int]) -> list[frozenset[str]]:
    holders = index.holders()
    return [holders_of_mask(mask, holders) for mask in index.lookup(hashes)]


# -- BlockIndex ---------------------------------------------------------------------------


def test_store_lookup_remove_per_endpoint_and_medium() -> None:
    index = BlockIndex(max_blocks=100)
    blocks = chain(4, seed=1)
    index.store("a", blocks, "GPU", NOW)
    index.store("b", blocks[:2], "GPU", NOW + 5)
    index.store("a", blocks[:1], "CPU", NOW + 5)
    assert held(index, blocks) == [{"a", "b"}, {"a", "b"}, {"a"}, {"a"}]
    assert index.last_stored(blocks[0]) == int(NOW + 5)
    assert index.last_stored(blocks[3]) == int(NOW)

    index.remove("a", blocks, "GPU")
    assert held(index, blocks) == [{"a", "b"}, {"b"}, frozenset(), frozenset()]  # a's CPU copy stays
    assert len(index) == 2 and index.last_stored(blocks[3]) is None
    index.remove("c", blocks, "GPU")  # an unknown endpoint changes nothing
    index.remove("b", [12345], "GPU")  # nor does an unknown hash
    assert len(index) == 2


def test_apply_ops_in_order_and_clear() -> None:
    index = BlockIndex(max_blocks=100)
    blocks = chain(3, seed=2)
    index.apply(
        "a",
        [
            BlockOp(BlockOpKind.STORED, blocks),
            BlockOp(BlockOpKind.REMOVED, blocks[2:]),
            BlockOp(BlockOpKind.STORED, blocks[2:], "CPU"),
        ],
        NOW,
    )
    index.store("b", blocks[:1], "GPU", NOW)
    assert held(index, blocks) == [{"a", "b"}, {"a"}, {"a"}]
    index.apply("a", [BlockOp(BlockOpKind.CLEARED)], NOW)
    assert held(index, blocks) == [{"b"}, frozenset(), frozenset()]
    assert len(index) == 1


def test_drop_endpoint_frees_its_holder_ids_for_reuse() -> None:
    index = BlockIndex(max_blocks=100)
    blocks = chain(3, seed=3)
    index.store("a", blocks, "GPU", NOW)
    index.store("a", blocks, "CPU", NOW)
    index.store("b", blocks, "GPU", NOW)
    index.drop_endpoint("a")
    assert held(index, blocks) == [{"b"}] * 3
    assert index.holders() == [None, None, ("b", "GPU")]
    index.store("c", blocks[:1], "GPU", NOW)
    assert index.holders()[0] == ("c", "GPU")  # the lowest free id: masks stay small
    index.drop_endpoint("b")
    index.drop_endpoint("c")
    assert len(index) == 0


def test_lru_bound_evicts_least_recent_chain_tails_first() -> None:
    index = BlockIndex(max_blocks=6)
    old, hot, new = chain(3, seed=4), chain(3, seed=5), chain(3, seed=6)
    index.store("a", old, "GPU", NOW)
    index.store("a", hot, "GPU", NOW)
    index.lookup(old[:1])  # a hit is a use: the old chain's head becomes the most recent block
    index.store("a", new, "GPU", NOW)
    assert len(index) == 6 and index.evicted == 3
    # Evicted: the old chain's tail, then the hot chain's tail; never a head before its tail.
    assert held(index, old) == [{"a"}, frozenset(), frozenset()]
    assert held(index, hot) == [{"a"}, {"a"}, frozenset()]
    assert held(index, new) == [{"a"}] * 3


def test_eviction_works_in_batches_below_the_bound() -> None:
    index = BlockIndex(max_blocks=640)
    for seed in range(20):
        index.store("a", chain(64, seed=seed), "GPU", NOW)
    assert 640 - 640 // 64 <= len(index) <= 640
    assert index.evicted == 20 * 64 - len(index)
    assert index.estimated_bytes() > len(index) * 32


@pytest.mark.parametrize(
    ("holders", "expected"),
    [
        ({}, {"a": 0, "b": 0}),
        ({0: {"a", "b"}, 1: {"a", "b"}, 2: {"a"}, 3: {"a", "b"}}, {"a": 4, "b": 2}),
        ({0: {"b"}, 1: {"a", "b"}, 2: {"a", "b"}}, {"a": 0, "b": 3}),
        ({1: {"a"}, 2: {"a"}}, {"a": 0, "b": 0}),
        ({0: {"a", "c"}}, {"a": 1, "b": 0}),  # "c" is not a candidate
    ],
)
def test_longest_prefix_counts_leading_blocks_only(holders: dict[int, set[str]], expected: dict[str, int]) -> None:
    assert longest_prefix([0, 1, 2, 3], holders, ["a", "b"]) == expected


def test_shard_of_spreads_sequential_hashes() -> None:
    counts = [0] * 4
    for block_hash in range(4000):
        counts[shard_of(block_hash, 4)] += 1
    assert all(900 < count < 1100 for count in counts), counts
    assert shard_of(-1, 4) == shard_of((1 << 64) - 1, 4)  # signed and unsigned views agree


# -- ShardCore: the delivery rules -------------------------------------------------------


def blocks_of(core: ShardCore, endpoint: str, hashes: list[int]) -> list[bool]:
    return [endpoint in names for names in held(core.index, hashes)]


def test_shard_applies_reordered_ops_in_sequence() -> None:
    core = ShardCore(max_blocks=100)
    x = chain(1, seed=7)
    assert core.replace("a", "feed1", 0, [], NOW)
    assert core.apply("a", "feed1", 2, [BlockOp(BlockOpKind.REMOVED, x)], NOW)  # early: held back
    assert core.apply("a", "feed1", 1, [BlockOp(BlockOpKind.STORED, x)], NOW)
    assert blocks_of(core, "a", x) == [False]  # stored, then removed: in sequence order
    assert core.apply("a", "feed1", 1, [BlockOp(BlockOpKind.STORED, x)], NOW)  # a late duplicate is ignored
    assert blocks_of(core, "a", x) == [False]
    assert core.batches_applied == 2 and core.endpoints == 1


def test_shard_that_lost_an_endpoint_asks_for_a_replace_and_keeps_later_ops() -> None:
    core = ShardCore(max_blocks=100)
    x, y, z = chain(3, seed=8)
    # A restarted shard knows nothing of the feed: it refuses and waits for a replace.
    assert not core.apply("a", "feed1", 5, [BlockOp(BlockOpKind.STORED, [x])], NOW)
    assert not core.apply("a", "feed1", 7, [BlockOp(BlockOpKind.STORED, [z])], NOW)  # sent after the replace
    assert not core.replace("a", "feed1", 5, [BlockOp(BlockOpKind.STORED, [x])], NOW)  # older than the loss
    assert blocks_of(core, "a", [x, y, z]) == [False, False, False]
    assert core.replace("a", "feed1", 6, [BlockOp(BlockOpKind.STORED, [x, y])], NOW)
    assert blocks_of(core, "a", [x, y, z]) == [True, True, True]
    assert core.apply("a", "feed1", 8, [], NOW)  # a heartbeat in sequence


def test_shard_drops_endpoint_when_its_feed_changes_or_is_dropped() -> None:
    core = ShardCore(max_blocks=100)
    x = chain(1, seed=9)
    assert core.replace("a", "old", 0, [BlockOp(BlockOpKind.STORED, x)], NOW)
    # A restarted subscriber is a new feed: the old entries go at once.
    assert not core.apply("a", "new", 1, [], NOW)
    assert blocks_of(core, "a", x) == [False]
    assert core.replace("a", "new", 2, [BlockOp(BlockOpKind.STORED, x)], NOW)
    core.drop_endpoint("a")
    assert blocks_of(core, "a", x) == [False] and core.endpoints == 0
    # A stopped subscriber's late calls cannot bring the endpoint back ...
    assert not core.apply("a", "new", 3, [BlockOp(BlockOpKind.STORED, x)], NOW)
    assert not core.replace("a", "new", 4, [BlockOp(BlockOpKind.STORED, x)], NOW)
    assert blocks_of(core, "a", x) == [False]
    # ... but a new subscriber for the endpoint can.
    assert core.replace("a", "newer", 0, [BlockOp(BlockOpKind.STORED, x)], NOW)
    assert blocks_of(core, "a", x) == [True]


# -- Ray: subscriber -> shards -> client ----------------------------------------------------


class StandInEnginePublisher:
    """Stands in for an engine's KV-event publisher (vLLM's ``ZmqEventPublisher``).

    PUB socket: multipart ``[topic, seq, payload]``; ROUTER replay socket answering
    ``[b"", start_seq]`` with the buffered batches then ``END_OF_REPLAY``. ``publish(...,
    send=False)`` numbers and buffers a batch without sending it live: a lost message.
    """

    def __init__(self, buffer_steps: int = 1000, topic: str = "kv") -> None:
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self._pub.bind_to_random_port('tcp://127.0.0.1')}"
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self.replay_endpoint = f"tcp://127.0.0.1:{self._router.bind_to_random_port('tcp://127.0.0.1')}"
        self.topic = topic
        self.next_seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._replayer = threading.Thread(target=self._serve_replay, daemon=True)
        self._replayer.start()

    def publish(self, *events: KVEvent, send: bool = True) -> int:
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(EventBatch(time.time(), list(events)))
        with self._lock:
            self._buffer.append((seq, payload))
        if send:
            self._pub.send_multipart([self.topic.encode(), encode_seq(seq), payload])
        return seq

    def _serve_replay(self) -> None:
        while not self._closing.is_set():
            if not self._router.poll(50):
                continue
            identity, _, start = self._router.recv_multipart()
            start_seq = int.from_bytes(start, "big", signed=True)
            with self._lock:
                batches = [(seq, payload) for seq, payload in self._buffer if seq >= start_seq]
            for seq, payload in batches:
                self._router.send_multipart([identity, b"", encode_seq(seq), payload])
            self._router.send_multipart([identity, b"", encode_seq(END_OF_REPLAY), b""])

    def close(self) -> None:
        self._closing.set()
        self._replayer.join()
        self._pub.close()
        self._router.close()
        self._context.term()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def shards(ray_cluster: None) -> Iterator[list[ray.actor.ActorHandle]]:
    handles = ensure_index(num_shards=2, max_blocks_per_shard=10_000)
    yield handles
    for handle in handles:
        ray.kill(handle, no_restart=True)


@pytest.fixture
def client(shards: list[ray.actor.ActorHandle]) -> KVIndexClient:
    return KVIndexClient(shards)


class Engine:
    """A stand-in publisher and the subscriber following it, as one test's engine."""

    def __init__(
        self,
        name: str,
        shards: list[ray.actor.ActorHandle],
        replay: bool = True,
        buffer_steps: int = 1000,
        max_mirror_blocks: int = 1000,
    ) -> None:
        self.name = name
        self.publisher = StandInEnginePublisher(buffer_steps)
        self.subscriber = KVEventSubscriber.remote(
            name,
            self.publisher.endpoint,
            self.publisher.replay_endpoint if replay else None,
            shards,
            topic=self.publisher.topic,
            max_mirror_blocks=max_mirror_blocks,
            heartbeat_s=0.2,
        )

    async def status(self) -> SubscriberStatus:
        return await self.subscriber.status.remote()

    async def caught_up(self) -> None:
        """Publish empty batches until the subscriber has applied the latest one: a PUB socket
        drops what it sends before the subscriber has connected."""

        async def latest_applied() -> bool:
            last_seq = (await self.status()).last_seq
            if last_seq is not None and last_seq == self.publisher.next_seq - 1:
                return True
            self.publisher.publish()
            return False

        await eventually(latest_applied, f"{self.name} follows its publisher")


@pytest.fixture
def engines(shards: list[ray.actor.ActorHandle]) -> Iterator[Callable[..., Engine]]:
    started: list[Engine] = []

    def start(name: str, **options: object) -> Engine:
        engine = Engine(name, shards, **options)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        ray.kill(engine.subscriber, no_restart=True)
        engine.publisher.close()
    ray.get([shard.drop_endpoint.remote(engine.name) for engine in started for shard in shards])


async def test_index_follows_stored_removed_and_cleared_blocks(
    engines: Callable[..., Engine], client: KVIndexClient, shards: list[ray.actor.ActorHandle]
) -> None:
    engine = engines("engine-a")
    await engine.caught_up()
    prompt = chain(8, seed=10)
    assert {shard_of(block_hash, 2) for block_hash in prompt} == {0, 1}  # both shards take part

    async def matched(expected: dict[str, int]) -> bool:
        return await client.lookup(prompt, ["engine-a", "engine-b"], budget_s=5.0) == expected

    engine.publisher.publish(stored(prompt[:4]), stored(prompt[4:]))
    await eventually(lambda: matched({"engine-a": 8, "engine-b": 0}), "the stored prompt is found")
    engine.publisher.publish(BlockRemoved(prompt[5:], "GPU"))
    await eventually(lambda: matched({"engine-a": 5, "engine-b": 0}), "removed blocks are gone")
    engine.publisher.publish(AllBlocksCleared())
    await eventually(lambda: matched({"engine-a": 0, "engine-b": 0}), "a cleared cache is gone")
    engine.publisher.publish(stored(prompt))
    await eventually(lambda: matched({"engine-a": 8, "engine-b": 0}), "the prompt is found again")
    assert (await engine.status()).mirror_blocks == 8

    # An endpoint that leaves has all its entries dropped.
    await engine.subscriber.stop.remote()
    assert await matched({"engine-a": 0, "engine-b": 0})
    stats = await asyncio.gather(*(shard.stats.remote() for shard in shards))
    assert sum(s.blocks for s in stats) == 0


async def test_a_gap_in_sequence_is_filled_by_replay(engines: Callable[..., Engine], client: KVIndexClient) -> None:
    engine = engines("engine-gap")
    await engine.caught_up()
    before = await engine.status()
    lost, seen = chain(4, seed=11), chain(4, seed=12)
    engine.publisher.publish(stored(lost), send=False)
    last = engine.publisher.publish(stored(seen))

    async def both_found() -> bool:
        found = [await client.lookup(blocks, ["engine-gap"], budget_s=5.0) for blocks in (lost, seen)]
        return found == [{"engine-gap": 4}] * 2

    await eventually(both_found, "the lost batch is replayed")
    after = await engine.status()
    assert after.last_seq == last
    assert after.gaps == before.gaps + 1 and after.replays == before.replays + 1
    assert after.resyncs == before.resyncs == 0


@pytest.mark.parametrize("replay", [True, False], ids=["buffer-rolled-over", "no-replay-socket"])
async def test_an_unrepairable_gap_resyncs_without_false_positives(
    engines: Callable[..., Engine], client: KVIndexClient, replay: bool
) -> None:
    engine = engines(f"engine-resync-{replay}", replay=replay, buffer_steps=2)
    await engine.caught_up()
    old, new = chain(4, seed=13), chain(4, seed=14)
    engine.publisher.publish(stored(old))
    await eventually(lambda: client_finds(client, old, engine.name, 4), "the first prompt is found")
    # The engine evicts `old`, but the message is lost and rolls out of the replay buffer.
    engine.publisher.publish(BlockRemoved(old, "GPU"), send=False)
    engine.publisher.publish(send=False)
    engine.publisher.publish(send=False)
    engine.publisher.publish(stored(new))
    await eventually(lambda: client_finds(client, new, engine.name, 4), "the new prompt is found")
    assert await client_finds(client, old, engine.name, 0)  # the evicted prompt is not reported
    status = await engine.status()
    assert status.resyncs == 1 and status.mirror_blocks == 4


async def client_finds(client: KVIndexClient, blocks: list[int], endpoint: str, count: int) -> bool:
    return await client.lookup(blocks, [endpoint], budget_s=5.0) == {endpoint: count}


async def test_a_restarted_shard_is_rebuilt_from_the_subscribers_mirror(
    engines: Callable[..., Engine], client: KVIndexClient, shards: list[ray.actor.ActorHandle]
) -> None:
    engine = engines("engine-restart")
    await engine.caught_up()
    prompt = chain(8, seed=15)
    engine.publisher.publish(stored(prompt))
    await eventually(lambda: client_finds(client, prompt, engine.name, 8), "the prompt is found")
    before = await shards[0].stats.remote()

    ray.kill(shards[0], no_restart=False)

    async def restarted() -> bool:
        try:
            return (await shards[0].stats.remote()).incarnation != before.incarnation
        except ray.exceptions.RayError:  # unavailable while it restarts
            return False

    await eventually(restarted, "Ray restarts the shard")
    # The engine is idle: the subscriber's heartbeat finds the empty shard and re-sends.
    await eventually(lambda: client_finds(client, prompt, engine.name, 8), "the rebuilt shard finds the prompt")
    assert (await shards[0].stats.remote()).replaces >= 1


async def test_mirror_bound_drops_the_oldest_blocks_from_the_index_too(
    engines: Callable[..., Engine], client: KVIndexClient
) -> None:
    engine = engines("engine-small", max_mirror_blocks=4)
    await engine.caught_up()
    prompt = chain(8, seed=17)
    engine.publisher.publish(stored(prompt))
    # Past the bound the chain's tail goes first, so its head still matches.
    await eventually(lambda: client_finds(client, prompt, engine.name, 4), "the prompt's head is found")
    assert await client_finds(client, prompt[4:], engine.name, 0)
    assert (await engine.status()).mirror_blocks == 4


async def test_lookup_past_its_budget_returns_none(client: KVIndexClient) -> None:
    prompt = chain(128, seed=16)
    assert await client.lookup(prompt, ["x"], budget_s=0.0) is None
    assert await client.lookup(prompt, ["x"], budget_s=5.0) == {"x": 0}
    assert await client.lookup([], ["x"], budget_s=0.0) == {"x": 0}


def test_ensure_index_returns_the_existing_named_shards(shards: list[ray.actor.ActorHandle]) -> None:
    again = ensure_index(num_shards=2, max_blocks_per_shard=5)
    assert [handle._actor_id for handle in again] == [handle._actor_id for handle in shards]
    named = ray.get_actor(SHARD_NAME.format(1), namespace=NAMESPACE)
    assert ray.get(named.stats.remote()).max_blocks == 10_000  # created once, with its first size
