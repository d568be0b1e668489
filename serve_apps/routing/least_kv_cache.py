"""``least-kv-cache``: the endpoint whose engine reports the lowest KV-cache usage.

Signal: ``vllm:kv_cache_usage_perc`` from the engine's ``/metrics`` (``engine_metrics``,
scraped by ``serve_apps.scraper``), used only if at most ``max_age_s`` old. KV usage sees the
engine's whole load, other gateways' included, and grows with long contexts that a request
count misses. Tie-break: uniform random. If any candidate has no fresh scrape, the engines
cannot be compared on the same footing, so the pick falls back to least-request and is
counted (reason ``no-metrics`` or ``stale-metrics``).
"""

from __future__ import annotations

import random
import time
from typing import Callable, ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum
from serve_apps.routing.fallback import FallbackCounter, LeastRequestFallback
from serve_apps.routing.signals import fresh

# Four missed scrapes at the scraper's default 0.5 s interval.
DEFAULT_MAX_AGE_S = 2.0


def _kv_usage(endpoint: EndpointState) -> float:
    assert endpoint.engine_metrics is not None
    return endpoint.engine_metrics.kv_cache_usage


class LeastKvCacheStrategy:
    name: ClassVar[str] = "least-kv-cache"

    def __init__(
        self,
        rng: random.Random | None = None,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        fallbacks: FallbackCounter | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._max_age_s = max_age_s
        self._clock = clock
        self._fallback = LeastRequestFallback(self.name, self._rng, fallbacks)

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        now = self._clock()
        for candidate in candidates:
            if candidate.engine_metrics is None:
                return self._fallback.choose("no-metrics", request, candidates)
            if fresh(candidate.engine_metrics, now, self._max_age_s) is None:
                return self._fallback.choose("stale-metrics", request, candidates)
        return pick_uniform_minimum(candidates, _kv_usage, self._rng)
