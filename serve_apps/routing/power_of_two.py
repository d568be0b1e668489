"""``power-of-two``: draw two distinct endpoints at random, send to the one with fewer in flight.

Signal: ``EndpointState.in_flight`` (local and exact, so it is never missing or stale and
this strategy never falls back). Tie-break: the first endpoint drawn. Two random choices
get most of least-request's balance while herding less when several gateway replicas each
see only their own in-flight counts (Mitzenmacher, "The Power of Two Choices").
"""

from __future__ import annotations

import random
from typing import ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest


class PowerOfTwoStrategy:
    name: ClassVar[str] = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if second.in_flight < first.in_flight else first
