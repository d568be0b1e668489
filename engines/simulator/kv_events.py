"""The simulator's KV event publisher: vLLM's ``ZmqEventPublisher``, frame for frame.

``--kv-events-config`` with events enabled and the ``zmq`` publisher gives:

- a PUB socket at ``endpoint``, bound when the address has ``*``, ``::``, ``ipc://`` or
  ``inproc://`` and connected otherwise (vLLM's rule), its high-water mark ``hwm``; each
  engine step that changed the cache sends one batch ``[topic, seq, payload]``, ``seq``
  counting batches from 0 and the batch stamped with ``time.time()`` when the step ran;
- a ROUTER socket at ``replay_endpoint`` that answers a start sequence with every batch
  still among the last ``buffer_steps``, then the end-of-replay frame (see
  ``rayfleet.protocol.kv_events`` for the frames).

As in vLLM, a background thread owns the sockets: the engine loop only stamps the batch,
gives it its sequence number and queues it, so encoding and sending never hold up a step.
The queue holds ``max_queue_size`` batches; where vLLM would then block its scheduler, the
simulator drops the batch instead of stalling its event loop (and the HTTP server with it).
The dropped batch keeps its sequence number, so subscribers see the gap and resynchronise,
as they must after any loss. Replies to one replay request are bounded by ``buffer_steps``,
so the ROUTER's send high-water mark is set above that and a full replay is never cut short
(vLLM keeps ZMQ's default of 1,000).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections import deque

import zmq

from rayfleet.protocol.kv_events import (
    END_OF_REPLAY,
    EventBatch,
    KVEvent,
    KVEventsConfig,
    decode_seq,
    encode_batch,
    encode_seq,
)

_POLL_S = 0.05  # how long the publisher thread waits for a batch before checking replay requests
_BIND_MARKERS = ("*", "::")
_BIND_SCHEMES = ("ipc://", "inproc://")


def _attach(socket: zmq.Socket, endpoint: str) -> None:
    if any(marker in endpoint for marker in _BIND_MARKERS) or endpoint.startswith(_BIND_SCHEMES):
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)


class ZmqKVEventPublisher:
    """Publishes one engine's KV events; ``publish`` is the engine core's ``kv_event_sink``."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        """Sockets are set up here so that a bad or busy endpoint fails the start (ZMQError)."""
        self._rank = data_parallel_rank
        self._topic = config.topic.encode()
        self._queue: queue.Queue[tuple[int, EventBatch]] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=config.buffer_steps)  # (seq, frame, payload)
        self._next_seq = 0
        self.num_dropped = 0
        self._closing = threading.Event()
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._replay: zmq.Socket | None = None
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.set_hwm(config.hwm)
            _attach(self._pub, config.endpoint)
            if config.replay_endpoint is not None:
                self._replay = self._context.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.setsockopt(zmq.SNDHWM, config.buffer_steps + 1)
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError:
            self._close_sockets()
            self._context.term()
            raise
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    def publish(self, events: list[KVEvent]) -> None:
        """Queue one engine step's events as one batch; never blocks."""
        seq = self._next_seq
        self._next_seq += 1
        try:
            self._queue.put_nowait((seq, EventBatch(time.time(), events, self._rank)))
        except queue.Full:
            self.num_dropped += 1
            if self.num_dropped == 1:
                print(f"WARNING: KV event queue full; dropped batch {seq} (and will drop more)", file=sys.stderr)

    def close(self) -> None:
        """Send what is queued, then close the sockets without lingering."""
        self._closing.set()
        self._thread.join()
        self._context.term()

    def _run(self) -> None:
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay(self._replay)
                try:
                    seq, batch = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                self._send(seq, batch)
        finally:
            self._close_sockets()

    def _send(self, seq: int, batch: EventBatch) -> None:
        seq_frame = encode_seq(seq)
        payload = encode_batch(batch)
        try:
            self._pub.send_multipart((self._topic, seq_frame, payload))
        except zmq.ZMQError:  # vLLM logs and goes on: the subscriber sees a gap and replays
            traceback.print_exc(file=sys.stderr)
        self._buffer.append((seq, seq_frame, payload))

    def _serve_replay(self, router: zmq.Socket) -> None:
        """Answer ``[identity, (b""), start_seq]``: the buffered batches from ``start_seq`` on,
        then the end-of-replay frame, each after the identity and delimiter it came with."""
        frames = router.recv_multipart()
        envelope, request = frames[:-1], frames[-1]
        if len(envelope) not in (1, 2) or envelope[1:] not in ([], [b""]) or len(request) != 8:
            print(f"WARNING: ignoring malformed KV event replay request {frames!r:.200}", file=sys.stderr)
            return
        start_seq = decode_seq(request)
        for seq, seq_frame, payload in self._buffer:
            if seq >= start_seq:
                router.send_multipart((*envelope, seq_frame, payload))
        router.send_multipart((*envelope, encode_seq(END_OF_REPLAY), b""))

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
