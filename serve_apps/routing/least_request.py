"""``least-request``: the endpoint with the fewest requests in flight from this gateway.

Signal: ``EndpointState.in_flight``, exact and local (no scrape delay). Tie-break: uniform
random among the endpoints at the minimum, so a quiet fleet is still spread evenly.
"""

from __future__ import annotations

import random
from typing import ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum


def _in_flight(endpoint: EndpointState) -> int:
    return endpoint.in_flight


class LeastRequestStrategy:
    name: ClassVar[str] = "least-request"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        return pick_uniform_minimum(candidates, _in_flight, self._rng)
