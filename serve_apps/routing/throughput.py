"""``throughput``: the endpoint that recently processed the fewest weighted tokens for us.

Signal: ``GatewayStats.weighted_tokens(now)``, prompt + 2 x output tokens of finished
requests decayed with a 30 s half-life, so it balances work done rather than request
counts (one 8k-token request weighs as much as many short ones). Measured locally, so it is
never missing or stale and this strategy never falls back. Tie-break: uniform random.
"""

from __future__ import annotations

import random
import time
from typing import Callable, ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum


class ThroughputStrategy:
    name: ClassVar[str] = "throughput"

    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._rng = rng or random.Random()
        self._clock = clock

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        now = self._clock()
        return pick_uniform_minimum(candidates, lambda endpoint: endpoint.stats.weighted_tokens(now), self._rng)
