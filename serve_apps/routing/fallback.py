"""Counting every time a signal-driven strategy falls back to least-request.

A strategy whose signal is missing (no scrape yet, no session or user header) or stale
(scraping failed) cannot rank the endpoints, so it routes by least-request instead. That must
be visible: a dashboard that says "least-kv-cache" while every request is really routed by
least-request would mislead whoever tunes the fleet. ``FALLBACKS`` is the process-wide
counter the gateway exports; the log line is rate-limited so a dead scraper cannot flood it.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest
from serve_apps.routing.least_request import LeastRequestStrategy

logger = logging.getLogger(__name__)

DEFAULT_LOG_INTERVAL_S = 30.0


class FallbackCounter:
    """Fallbacks per (strategy, reason), with at most one log line per key per interval."""

    def __init__(
        self, log_interval_s: float = DEFAULT_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log_interval_s = log_interval_s
        self._clock = clock
        self._counts: dict[tuple[str, str], int] = {}
        self._last_logged: dict[tuple[str, str], float] = {}

    def count(self, strategy: str, reason: str) -> None:
        key = (strategy, reason)
        self._counts[key] = self._counts.get(key, 0) + 1
        now = self._clock()
        last = self._last_logged.get(key)
        if last is None or now - last >= self._log_interval_s:
            self._last_logged[key] = now
            logger.warning(
                "routing strategy %s fell back to least-request (%s); %d times so far",
                strategy, reason, self._counts[key],
            )  # fmt: skip

    def get(self, strategy: str, reason: str) -> int:
        return self._counts.get((strategy, reason), 0)

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Cumulative counts, e.g. for a Prometheus counter labelled strategy and reason."""
        return dict(self._counts)


FALLBACKS = FallbackCounter()


class LeastRequestFallback:
    """The least-request pick a strategy uses when it cannot rank, counted under its name."""

    def __init__(self, strategy: str, rng: random.Random, counter: FallbackCounter | None) -> None:
        self._strategy = strategy
        self._counter = counter or FALLBACKS
        self._least_request = LeastRequestStrategy(rng=rng)

    def choose(self, reason: str, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        self._counter.count(self._strategy, reason)
        return self._least_request.choose(request, candidates)
