"""``random``: a uniform pick among the ready endpoints.

Signal: none. Tie-break: not applicable. It is the baseline every other strategy must beat.
"""

from __future__ import annotations

import random
from typing import ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest


class RandomStrategy:
    name: ClassVar[str] = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)
