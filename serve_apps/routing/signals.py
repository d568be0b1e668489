"""The load signals signal-driven strategies read, and the pure updates that maintain them.

Two sources, kept apart because they age differently:

- ``EngineMetrics``: what the engine itself reports on ``/metrics`` (scraped every ~0.5 s by
  ``serve_apps.scraper``). It sees every client of the engine, not just this gateway, but it
  is late by up to one scrape interval and can go stale if scraping fails, so a reader must
  pass it through ``fresh`` first.
- ``GatewayStats``: what this gateway replica measured itself on the requests it relayed.
  Always current, but blind to traffic from other replicas.

Every method takes ``now`` (monotonic seconds) instead of reading a clock, so the same code
runs under the discrete-event benchmarks' virtual time and in tests with hand-made times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Half-life of the decayed busy time and token counts: long enough to smooth one request's
# burst, short enough that an endpoint which went quiet a minute ago looks quiet.
DEFAULT_HALF_LIFE_S = 30.0
# Weight of one output token against one prompt token: decode is the slow, memory-bound
# phase, so an output token costs an engine roughly twice a prefilled token (AIBrix's weights).
OUTPUT_TOKEN_WEIGHT = 2.0
# EWMA weight of the newest latency sample: ~10 requests of memory.
LATENCY_EWMA_ALPHA = 0.2


@dataclass(slots=True)
class EngineMetrics:
    """One scrape of an engine's gauges; counts are summed over its engines (data parallel)."""

    scraped_at: float  # monotonic seconds
    num_requests_running: float
    num_requests_waiting: float
    kv_cache_usage: float  # fraction 0..1


def fresh(metrics: EngineMetrics | None, now: float, max_age_s: float) -> EngineMetrics | None:
    """``metrics`` if it was scraped at most ``max_age_s`` ago, else None.

    A stale scrape describes a load that has since changed by an unknown amount; routing on
    it would keep sending traffic to whichever endpoint looked idle when scraping stopped.
    """
    if metrics is None or now - metrics.scraped_at > max_age_s:
        return None
    return metrics


def _ewma(current: float, sample: float, samples_so_far: int) -> float:
    # The first sample replaces the zero start instead of being averaged with it.
    if samples_so_far == 0:
        return sample
    return current + LATENCY_EWMA_ALPHA * (sample - current)


def _decay(elapsed_s: float, half_life_s: float) -> float:
    return math.exp(-math.log(2.0) * elapsed_s / half_life_s) if elapsed_s > 0 else 1.0


@dataclass(slots=True)
class GatewayStats:
    """Per-endpoint measurements this gateway replica takes on the requests it relays.

    - Latency: EWMAs of TTFT and of the time per output token (``ttft_ewma_s``,
      ``tpot_ewma_s``), with ``latency_samples`` telling a cold endpoint from a fast one.
    - Busy time: seconds during which at least one request was in flight, exponentially
      decayed with ``half_life_s``. Decay rather than a window keeps it O(1) memory and
      time; an always-busy endpoint converges to ``half_life_s / ln 2`` (~43 s at 30 s).
    - Tokens: prompt + 2 x output tokens of finished requests, decayed with the same
      half-life, i.e. a smoothed measure of the work the endpoint recently did for us.

    Decayed quantities are stored as of ``updated_at`` and read with ``busy_time(now)`` /
    ``weighted_tokens(now)`` so that endpoints updated at different moments compare fairly.
    """

    half_life_s: float = DEFAULT_HALF_LIFE_S
    active: int = 0
    updated_at: float = 0.0
    busy_decayed_s: float = 0.0
    tokens_decayed: float = 0.0
    ttft_ewma_s: float = 0.0
    tpot_ewma_s: float = 0.0
    ttft_samples: int = 0
    latency_samples: int = 0  # finished requests with output; 0 means "never measured"

    def _advance(self, now: float) -> None:
        """Fold the decay (and busy time) since ``updated_at`` into the stored sums."""
        if now <= self.updated_at:
            return
        self.busy_decayed_s = self.busy_time(now)
        self.tokens_decayed = self.weighted_tokens(now)
        self.updated_at = now

    def record_start(self, now: float) -> None:
        """A request was sent to the endpoint."""
        self._advance(now)
        self.active += 1

    def record_finish(
        self, now: float, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float
    ) -> None:
        """A request ended (errors included; pass 0 tokens and ``ttft_s=None`` if unknown).

        ``ttft_s`` is None when the response was not streamed: the first byte then arrives
        with the last, so only ``e2e_s`` is known, and it is charged entirely to the per-token
        time (an over-estimate that includes prefill, but a comparable one across endpoints).
        """
        self._advance(now)
        self.active = max(self.active - 1, 0)
        self.tokens_decayed += prompt_tokens + OUTPUT_TOKEN_WEIGHT * output_tokens
        if output_tokens <= 0:
            return
        if ttft_s is None:
            tpot_s = e2e_s / output_tokens
        else:
            self.ttft_ewma_s = _ewma(self.ttft_ewma_s, ttft_s, self.ttft_samples)
            self.ttft_samples += 1
            tpot_s = max(e2e_s - ttft_s, 0.0) / max(output_tokens - 1, 1)
        self.tpot_ewma_s = _ewma(self.tpot_ewma_s, tpot_s, self.latency_samples)
        self.latency_samples += 1

    def busy_time(self, now: float) -> float:
        """Decayed busy seconds as of ``now`` (without mutating the stats).

        While busy, the interval since ``updated_at`` adds the exact decayed integral of a
        busy indicator: the integral of exp(-lambda (now - t)) dt over that interval.
        """
        elapsed = max(now - self.updated_at, 0.0)
        factor = _decay(elapsed, self.half_life_s)
        busy = self.busy_decayed_s * factor
        if self.active > 0:
            busy += (1.0 - factor) * self.half_life_s / math.log(2.0)
        return busy

    def weighted_tokens(self, now: float) -> float:
        """Decayed prompt + 2 x output tokens as of ``now``."""
        return self.tokens_decayed * _decay(max(now - self.updated_at, 0.0), self.half_life_s)

    def expected_latency(self, output_tokens: int) -> float:
        """Predicted seconds for a request of ``output_tokens``: TTFT + per-token time x tokens."""
        return self.ttft_ewma_s + self.tpot_ewma_s * output_tokens
