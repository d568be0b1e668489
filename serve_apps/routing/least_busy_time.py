"""``least-busy-time``: the endpoint that has recently been busy (≥1 request in flight from
this gateway) for the fewest seconds.

Signal: ``GatewayStats.busy_time(now)``, busy seconds decayed with a 30 s half-life (see
``signals.GatewayStats``). It is measured locally, so it is never missing or stale and this
strategy never falls back; a new endpoint starts at 0 s, which is true (it was idle).
Unlike in-flight counts it remembers the recent past, so one long request keeps an endpoint
"busier" than one that just finished many short ones. Tie-break: uniform random.
"""

from __future__ import annotations

import random
import time
from typing import Callable, ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum


class LeastBusyTimeStrategy:
    name: ClassVar[str] = "least-busy-time"

    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._rng = rng or random.Random()
        self._clock = clock

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        now = self._clock()
        return pick_uniform_minimum(candidates, lambda endpoint: endpoint.stats.busy_time(now), self._rng)
