"""``least-kv-cache``: the endpoint whose engine reports the lowest KV-cache usage.

Signal: ``vllm:kv_cache_usage_perc`` from the engine's ``/metrics`` (``engine_metrics``,
scraped by ``serve_apps.scraper``), used only if at most ``max_age_s`` old. KV usage sees the
engine's whole load, other gateways' included, and grows with long contexts that a request
count misses.

A scrape is up to one interval old, and ranking on it alone would send every request of
that interval to the same endpoint (at 100 req/s and 0.5 s, fifty in a row). So the usage
is projected: the scraped value plus, for each request this replica sent there since the
scrape, one request's share of the cache, estimated from the same scrape as usage per
running request (``DEFAULT_REQUEST_SHARE`` when nothing is running). With several gateway
replicas each corrects for its own sends, so a burst spreads instead of dog-piling.

Tie-break: uniform random. If any candidate has no fresh scrape, the engines cannot be
compared on the same footing, so the pick falls back to least-request and is counted
(reason ``no-metrics`` or ``stale-metrics``).
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
# One request's share of an idle engine's cache: a ~4k-token request on a ~400k-token cache.
DEFAULT_REQUEST_SHARE = 0.01


def projected_kv_usage(endpoint: EndpointState) -> float:
    """Scraped KV usage plus what the requests sent since that scrape will add."""
    metrics = endpoint.engine_metrics
    assert metrics is not None
    running = metrics.num_requests_running
    share = metrics.kv_cache_usage / running if running > 0 else DEFAULT_REQUEST_SHARE
    return metrics.kv_cache_usage + endpoint.dispatched_since_scrape * share


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
        return pick_uniform_minimum(candidates, projected_kv_usage, self._rng)
