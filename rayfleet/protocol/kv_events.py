"""vLLM's KV-cache events on the wire: the ``--kv-events-config`` settings, the event
structs, their msgpack encoding and the ZMQ framing.

vLLM (``vllm/distributed/kv_events.py``) encodes with msgspec. The batch is a positional
array ``[ts, [events...], data_parallel_rank]`` (``array_like=True``; the rank is left off
when None, which vLLM's publisher never sends: it stamps its own rank, 0 without data
parallelism). Events are tagged structs, and their shape changed once:

- up to vLLM PR #42892 (2026-05): tagged arrays ``["BlockStored", field, field, ...]``, with
  fields appended over the releases (``medium``, ``lora_name``, ``extra_keys``, ``group_idx``,
  ``kv_cache_spec_kind``, ``kv_cache_spec_sliding_window``);
- since: tagged maps ``{"type": "BlockStored", "block_hashes": ..., ...}``, fields in
  declaration order, and fields that equal their declared default (``omit_defaults``) left out.

``encode_batch`` writes the current (map) form; ``decode_batch`` reads both, by position or
by name, tolerating missing and unknown fields.

ZMQ, as vLLM's ``ZmqEventPublisher`` does it:

- PUB socket at ``endpoint`` (bound when the address has ``*``, ``::``, ``ipc://`` or
  ``inproc://``, connected otherwise); each message is multipart ``[topic, seq, payload]``
  with ``seq`` an 8-byte big-endian batch counter starting at 0.
- ROUTER socket at ``replay_endpoint`` (always bound): a DEALER sends ``[b"", start_seq]``
  and gets ``[b"", seq, payload]`` for every buffered batch from ``start_seq`` on, then
  ``[b"", seq=-1, b""]`` to end the replay. vLLM PR #45177 also puts the topic before
  ``seq`` in replies; ``decode_replay_reply`` reads either.

Block hashes travel as integers (vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``);
``kvcache.hashing`` computes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, model_validator

END_OF_REPLAY = -1
_SEQ = struct.Struct(">q")
MEDIUM_GPU = "GPU"


class KVEventsConfig(BaseModel):
    """``--kv-events-config``, with vLLM's field names and defaults."""

    model_config = ConfigDict(extra="forbid")

    enable_kv_cache_events: bool = False
    publisher: Literal["zmq", "null"] | None = None  # unset: "zmq" when events are enabled, as in vLLM
    endpoint: str = "tcp://*:5557"  # "*" as host binds; a host name connects
    replay_endpoint: str | None = None
    buffer_steps: int = Field(10_000, ge=1)  # batches kept for replay
    hwm: int = Field(100_000, ge=0)
    max_queue_size: int = Field(100_000, ge=1)
    topic: str = ""

    @model_validator(mode="after")
    def _default_publisher(self) -> KVEventsConfig:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"
        return self

    @property
    def publishing(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


@dataclass(slots=True)
class BlockStored:
    """Consecutive full blocks of one request became cached."""

    block_hashes: list[int]
    parent_block_hash: int | None  # None when the first block starts the sequence
    token_ids: list[int]  # the tokens of all the blocks, in order
    block_size: int
    lora_id: int | None  # None for the base model; deprecated in vLLM in favour of lora_name
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # per block: the extra keys its hash was computed with
    group_idx: int | None = None  # the KV cache group (one group for a plain decoder)
    kv_cache_spec_kind: str | None = None  # e.g. "full_attention"
    kv_cache_spec_sliding_window: int | None = None


@dataclass(slots=True)
class BlockRemoved:
    """Cached blocks were evicted (their physical blocks were reused)."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None


@dataclass(slots=True)
class AllBlocksCleared:
    """The prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


@dataclass(frozen=True, slots=True)
class _EventShape:
    cls: type[KVEvent]
    fields: tuple[str, ...]  # in vLLM's declaration order
    num_always: int  # leading fields without a default: msgspec writes them even when None
    num_needed: int  # leading fields every vLLM version has sent: decoding requires them


_SHAPES: dict[str, _EventShape] = {
    "BlockStored": _EventShape(
        BlockStored,
        (
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
            "group_idx",
            "kv_cache_spec_kind",
            "kv_cache_spec_sliding_window",
        ),
        num_always=7,
        num_needed=4,
    ),
    "BlockRemoved": _EventShape(BlockRemoved, ("block_hashes", "medium", "group_idx"), num_always=2, num_needed=1),
    "AllBlocksCleared": _EventShape(AllBlocksCleared, (), num_always=0, num_needed=0),
}


def _event_map(event: KVEvent) -> dict[str, Any]:
    tag = type(event).__name__
    shape = _SHAPES[tag]
    encoded: dict[str, Any] = {"type": tag}
    for position, name in enumerate(shape.fields):
        value = getattr(event, name)
        if position < shape.num_always or value is not None:
            encoded[name] = value
    return encoded


def encode_batch(batch: EventBatch) -> bytes:
    """msgpack bytes as current vLLM's msgspec encoder writes them."""
    head = [batch.ts, [_event_map(event) for event in batch.events]]
    if batch.data_parallel_rank is not None:
        head.append(batch.data_parallel_rank)
    return msgpack.packb(head)


def _decode_event(raw: Any) -> KVEvent | None:
    """One event, tagged map or tagged array; None for an event kind this decoder does not know.

    Fields an older engine did not send decode as None.
    """
    if isinstance(raw, dict):
        shape = _SHAPES.get(raw.get("type"))
        values = raw
    elif isinstance(raw, list) and raw:
        shape = _SHAPES.get(raw[0])
        values = dict(zip(shape.fields, raw[1:])) if shape is not None else {}
    else:
        raise ValueError(f"KV event is neither a tagged map nor a tagged array: {raw!r:.200}")
    if shape is None:
        return None
    missing = [name for name in shape.fields[: shape.num_needed] if name not in values]
    if missing:
        raise ValueError(f"KV event without {', '.join(missing)}: {raw!r:.200}")
    return shape.cls(**{name: values.get(name) for name in shape.fields})


def decode_batch(payload: bytes) -> EventBatch:
    """A batch from any vLLM version's encoding; unknown event kinds are skipped.

    Raises ValueError on bytes that are not a KV event batch at all.
    """
    try:
        raw = msgpack.unpackb(payload, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):  # a map-encoded batch, should vLLM ever drop array_like there too
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError(f"not a KV event batch: {raw!r:.200}")
    events = [event for event in map(_decode_event, raw[1]) if event is not None]
    rank = raw[2] if len(raw) > 2 else None
    return EventBatch(float(raw[0]), events, rank)


def encode_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def decode_seq(frame: bytes) -> int:
    if len(frame) != _SEQ.size:
        raise ValueError(f"sequence frame has {len(frame)} bytes, expected 8")
    return _SEQ.unpack(frame)[0]


def decode_replay_reply(frames: list[bytes]) -> tuple[int, bytes]:
    """``(seq, payload)`` of one replay reply, whatever precedes them (delimiter, topic);
    ``seq`` is ``END_OF_REPLAY`` on the closing reply."""
    if len(frames) < 2:
        raise ValueError(f"replay reply has {len(frames)} frames, expected at least 2")
    return decode_seq(frames[-2]), frames[-1]
