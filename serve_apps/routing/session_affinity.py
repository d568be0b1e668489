"""``session-affinity``: every request of one session goes to the same endpoint.

Signal: the ``x-session-id`` header. A session keeps the endpoint it was placed on while
that endpoint is among the ready candidates, so its KV cache (the conversation so far) is
reused. A new session, or one whose endpoint left, is placed by rendezvous hashing: the
candidate with the highest hash of (session id, endpoint name). Every gateway replica
computes the same answer from the same candidates without sharing state, and when an
endpoint leaves only its own sessions move. Tie-break: none needed (64-bit hashes).
No header: least-request, counted as a fallback (reason ``no-session-header``).

The remembered placements are an LRU of ``max_sessions`` entries; a forgotten session is
simply re-placed by the hash, which usually gives the same endpoint again.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import ClassVar, Sequence

import xxhash

from serve_apps.routing.base import EndpointState, RoutingRequest
from serve_apps.routing.fallback import FallbackCounter, LeastRequestFallback

SESSION_HEADER = "x-session-id"
DEFAULT_MAX_SESSIONS = 100_000


def rendezvous_pick(key: str, candidates: Sequence[EndpointState]) -> EndpointState:
    """The candidate with the highest hash of (key, endpoint name): highest-random-weight hashing."""
    return max(candidates, key=lambda endpoint: xxhash.xxh64_intdigest(f"{key}\x00{endpoint.name}".encode()))


class SessionAffinityStrategy:
    name: ClassVar[str] = "session-affinity"

    def __init__(
        self,
        rng: random.Random | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        fallbacks: FallbackCounter | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._max_sessions = max_sessions
        self._placements: OrderedDict[str, str] = OrderedDict()  # session id -> endpoint name
        self._fallback = LeastRequestFallback(self.name, self._rng, fallbacks)

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        session = request.headers.get(SESSION_HEADER)
        if not session:
            return self._fallback.choose("no-session-header", request, candidates)
        placed = self._placements.get(session)
        if placed is not None:
            for candidate in candidates:
                if candidate.name == placed:
                    self._placements.move_to_end(session)
                    return candidate
        chosen = rendezvous_pick(session, candidates)
        self._placements[session] = chosen.name
        self._placements.move_to_end(session)
        if len(self._placements) > self._max_sessions:
            self._placements.popitem(last=False)
        return chosen
