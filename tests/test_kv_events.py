"""KV events from real simulator processes, read the way a vLLM subscriber reads them.

A pyzmq SUB socket and a DEALER on the replay socket talk to the simulator over TCP; the
batches must be vLLM's (positional batch, tagged-map events, rank 0, consecutive sequence
numbers), the stored block hashes must equal what the gateway computes for the same request,
evictions must name exactly the evicted blocks, and the hash functions must be vLLM's
(checked against digests computed here straight from vLLM's definitions).
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq

from engines.core.tokenizer import NUM_WORD_TOKENS, get_tokenizer
from kvcache.hashing import HASH_FUNCTIONS, BlockHasher, external_block_hash
from rayfleet.ports import free_port
from rayfleet.protocol.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    decode_replay_reply,
    decode_seq,
    encode_seq,
)
from serve_apps.routing.base import RoutingRequest
from serve_apps.routing.prompt_blocks import block_hashes
from tests.simulator_fixtures import DEFAULT_MODEL, SimulatorProcess

pytestmark = pytest.mark.timeout(120)

TOPIC = f"kv@127.0.0.1@{DEFAULT_MODEL}"
RECEIVE_TIMEOUT_MS = 20_000  # generous: the machine may be busy, and nothing here is timed


def token_prompt(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(NUM_WORD_TOKENS), k=n)


def post(sim: SimulatorProcess, path: str, body: dict | None = None) -> bytes:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(f"{sim.url}{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def complete(sim: SimulatorProcess, prompt: list[int] | str) -> None:
    """One completion with a single output token, so the prompt's blocks are all that is cached."""
    post(sim, "/v1/completions", {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 1})


@dataclass
class Subscriber:
    """A vLLM KV event subscriber: live batches from the PUB socket, old ones from replay."""

    pub_port: int
    replay_port: int
    context: zmq.Context = field(default_factory=zmq.Context)
    received: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, payload) in arrival order

    def __post_init__(self) -> None:
        self.sub = self.context.socket(zmq.SUB)
        self.sub.connect(f"tcp://127.0.0.1:{self.pub_port}")
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())

    def next_batch(self, timeout_ms: int = RECEIVE_TIMEOUT_MS) -> EventBatch:
        assert self.sub.poll(timeout_ms), "no KV event batch arrived"
        topic, seq, payload = self.sub.recv_multipart()
        assert topic == TOPIC.encode()
        self.received.append((decode_seq(seq), payload))
        return decode_batch(payload)

    def join(self, sim: SimulatorProcess) -> None:
        """Wait out ZMQ's slow joiner: send one-block prompts until a batch gets through,
        then reset the cache so the test starts from an empty one."""
        for attempt in range(100):
            complete(sim, token_prompt(16, 1000 + attempt))
            if self.sub.poll(200):
                break
        else:
            pytest.fail("the subscription never took effect")
        post(sim, "/reset_prefix_cache")
        while self.next_batch().events != [AllBlocksCleared()]:
            pass  # a warm-up batch

    def replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        dealer = self.context.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{self.replay_port}")
        try:
            dealer.send_multipart([b"", encode_seq(start_seq)])
            replies = []
            while True:
                assert dealer.poll(RECEIVE_TIMEOUT_MS), "replay did not answer"
                frames = dealer.recv_multipart()
                assert frames[0] == b"" and len(frames) == 3
                seq, payload = decode_replay_reply(frames)
                if seq == END_OF_REPLAY:
                    assert payload == b""
                    return replies
                replies.append((seq, payload))
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self.sub.close(linger=0)
        self.context.term()


KVSimulator = Callable[..., tuple[SimulatorProcess, Subscriber]]


@pytest.fixture
def kv_simulator(
    simulator_factory: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> Iterator[KVSimulator]:
    """``start(*flags, hash_seed=..., **kv_events_config)``: a simulator publishing KV events on
    free ports (its PYTHONHASHSEED set as rayfleet sets it), and a joined subscriber."""
    subscribers: list[Subscriber] = []

    def start(*flags: str, hash_seed: str = "0", **config: object) -> tuple[SimulatorProcess, Subscriber]:
        pub_port = replay_port = free_port()
        while replay_port == pub_port:  # each was free alone; the OS may hand out one twice
            replay_port = free_port()
        kv_events_config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{pub_port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": TOPIC,
            **config,
        }
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
        sim = simulator_factory(
            "--gpu", "instant", "--time-scale", "0", "--kv-events-config", json.dumps(kv_events_config), *flags
        )  # fmt: skip
        subscriber = Subscriber(pub_port, replay_port)
        subscribers.append(subscriber)
        subscriber.join(sim)
        return sim, subscriber

    yield start
    for subscriber in subscribers:
        subscriber.close()


def stored(batch: EventBatch) -> list[BlockStored]:
    return [event for event in batch.events if isinstance(event, BlockStored)]


@pytest.mark.parametrize(("algo", "seed"), [("sha256", "0"), ("sha256_cbor", "7")])
def test_stored_blocks_carry_the_gateways_hashes_in_vllms_batches(
    kv_simulator: KVSimulator, algo: str, seed: str
) -> None:
    flags = () if algo == "sha256" else ("--prefix-caching-hash-algo", algo)
    sim, subscriber = kv_simulator(*flags, hash_seed=seed)
    system = get_tokenizer().decode(token_prompt(300, 1))
    body = {"model": DEFAULT_MODEL, "max_tokens": 1, "messages": [{"role": "system", "content": system}]}
    before = time.time()
    post(sim, "/v1/chat/completions", body)
    batch = subscriber.next_batch()
    gateway = block_hashes(RoutingRequest(DEFAULT_MODEL, "/v1/chat/completions", body), BlockHasher(algo, seed))

    assert before <= batch.ts <= time.time() and batch.data_parallel_rank == 0
    (event,) = stored(batch)  # the whole prompt is prefilled in one step, so one event
    # The output token may complete one more block; the prompt's blocks are the gateway's.
    assert event.block_hashes[: len(gateway)] == gateway and len(event.block_hashes) - len(gateway) in (0, 1)
    assert (event.parent_block_hash, event.block_size, event.medium, event.lora_id, event.lora_name) == (
        None, 16, "GPU", None, None,
    )  # fmt: skip
    assert (event.group_idx, event.kv_cache_spec_kind) == (0, "full_attention")
    assert event.extra_keys == [None] * len(event.block_hashes)
    # On the wire: a positional batch of tagged maps, as vLLM writes them since PR #42892.
    _, (raw_event,), _ = msgpack.unpackb(subscriber.received[-1][1])
    assert list(raw_event)[:3] == ["type", "block_hashes", "parent_block_hash"] and raw_event["type"] == "BlockStored"
    # One batch per step, numbered without gaps from the first one this subscriber saw.
    seqs = [seq for seq, _ in subscriber.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_eviction_and_reset_are_published_for_exactly_the_blocks_they_drop(kv_simulator: KVSimulator) -> None:
    sim, subscriber = kv_simulator("--num-gpu-blocks-override", "16", "--max-model-len", "256")
    first, second = token_prompt(160, 2), token_prompt(160, 3)  # ten full blocks each
    complete(sim, first)
    (first_stored,) = stored(subscriber.next_batch())
    assert first_stored.block_hashes == BlockHasher().chain(first)

    # Sixteen blocks: the second prompt takes the six never cached, then evicts four of the
    # first prompt's, which were freed tail first, so its last four go, the last one first.
    complete(sim, second)
    batch = subscriber.next_batch()
    removed = [event for event in batch.events if isinstance(event, BlockRemoved)]
    assert [event.block_hashes for event in removed] == [[h] for h in reversed(first_stored.block_hashes[-4:])]
    assert all((event.medium, event.group_idx) == ("GPU", 0) for event in removed)
    assert [event.block_hashes for event in stored(batch)] == [BlockHasher().chain(second)]
    assert batch.events[: len(removed)] == removed  # evicted while allocating, before caching

    post(sim, "/reset_prefix_cache")
    assert subscriber.next_batch().events == [AllBlocksCleared()]
    seqs = [seq for seq, _ in subscriber.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_replay_returns_the_buffered_batches_from_a_sequence_number(kv_simulator: KVSimulator) -> None:
    sim, subscriber = kv_simulator(buffer_steps=3)
    for seed in range(4):
        complete(sim, token_prompt(32, 10 + seed))
        subscriber.next_batch()
    live = dict(subscriber.received)
    last = max(live)
    assert subscriber.replay(last - 1) == [(seq, live[seq]) for seq in (last - 1, last)]
    # Only the last three batches are kept, however far back the request reaches.
    assert subscriber.replay(0) == [(seq, live[seq]) for seq in range(last - 2, last + 1)]
    assert subscriber.replay(last + 1) == []


def test_an_endpoint_in_use_stops_the_simulator_from_starting(
    simulator_factory: Callable[..., SimulatorProcess],
) -> None:
    context = zmq.Context()
    busy = context.socket(zmq.PUB)
    port = busy.bind_to_random_port("tcp://*")
    try:
        config = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"})
        with pytest.raises(RuntimeError, match="(?s)exited with 2.*Address already in use"):
            simulator_factory("--gpu", "instant", "--kv-events-config", config)
    finally:
        busy.close(linger=0)
        context.term()


# sha256_cbor with PYTHONHASHSEED=0, computed from vLLM's definitions with hashlib and cbor2
# directly (not through kvcache.hashing):
#   root   = sha256(cbor2.dumps("0", canonical=True))                       # NONE_HASH
#   block0 = sha256(cbor2.dumps((root, tuple(range(16)), None), canonical=True))
#   block1 = sha256(cbor2.dumps((block0, tuple(range(16, 32)), None), canonical=True))
#   lora   = sha256(cbor2.dumps((root, tuple(range(16)), ("sql",)), canonical=True))
# each reported as int.from_bytes(digest, "big") & (2**64 - 1). The same block with vLLM's
# default sha256 (pickle, HIGHEST_PROTOCOL) gives SHA256_BLOCK0.
SHA256_CBOR_ROOT = "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
SHA256_CBOR_CHAIN = [12687895063098490012, 1814341696565857452]
SHA256_CBOR_LORA_BLOCK0 = 8742221617830640250
SHA256_BLOCK0 = 7982712666671721126


def test_hashes_equal_digests_computed_from_vllms_definitions() -> None:
    hasher = BlockHasher("sha256_cbor", "0")
    assert hasher.root.hex() == SHA256_CBOR_ROOT
    assert hasher.chain(list(range(40))) == SHA256_CBOR_CHAIN  # the 8 trailing tokens are no block
    assert hasher.chain(list(range(16)), ("sql",)) == [SHA256_CBOR_LORA_BLOCK0]
    assert BlockHasher().chain(list(range(16))) == [SHA256_BLOCK0]


@pytest.mark.parametrize("algo", sorted(HASH_FUNCTIONS))
def test_fast_paths_equal_the_reference_functions(algo: str) -> None:
    """The hand-rolled CBOR (and the bound pickle path) against vLLM's plain ``hash_fn(obj)``,
    over token ids of every CBOR width, with and without extra keys."""
    reference = HASH_FUNCTIONS[algo]
    rng = random.Random(algo)
    widths = (24, 256, 65_536, 1 << 32, 1 << 40)
    tokens = [rng.randrange(rng.choice(widths)) for _ in range(16 * 50)]
    for block_size, extra_keys in ((16, None), (7, ("adapter",)), (32, None)):
        hasher = BlockHasher(algo, "3", block_size)
        parent, expected = reference("3"), []
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = reference((parent, tuple(tokens[start : start + block_size]), extra_keys))
            expected.append(external_block_hash(parent))
        assert hasher.chain(tokens, extra_keys) == expected
