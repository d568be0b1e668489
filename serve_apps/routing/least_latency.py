"""``least-latency``: the endpoint predicted to answer this request soonest.

Signal: the gateway-measured EWMAs in ``GatewayStats``. Expected latency =
``ttft_ewma_s + tpot_ewma_s x n``, where ``n`` is the request's ``max_completion_tokens``
or ``max_tokens``, else ``default_output_tokens``; so a long generation favours the endpoint
with the fastest decode and a short one the fastest prefill/queue.

Cold start: an endpoint with no latency sample cannot be ranked, and would never get one if
it were never chosen, so a cold endpoint with nothing in flight from us is tried first
(one probe at a time; uniform among several). While every cold endpoint already has its
probe in flight, the warm endpoints are ranked as usual. If no endpoint is warm yet, the
pick falls back to least-request and is counted (reason ``no-latency-samples``).
Tie-break: uniform random.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum
from serve_apps.routing.fallback import FallbackCounter, LeastRequestFallback

DEFAULT_OUTPUT_TOKENS = 256


def requested_output_tokens(body: dict[str, Any], default: int) -> int:
    """The output length the client allowed, which is what it may cost."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


class LeastLatencyStrategy:
    name: ClassVar[str] = "least-latency"

    def __init__(
        self,
        rng: random.Random | None = None,
        default_output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        fallbacks: FallbackCounter | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._default_output_tokens = default_output_tokens
        self._fallback = LeastRequestFallback(self.name, self._rng, fallbacks)

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        idle_cold = [c for c in candidates if c.stats.latency_samples == 0 and c.in_flight == 0]
        if idle_cold:
            return idle_cold[0] if len(idle_cold) == 1 else self._rng.choice(idle_cold)
        warm = [c for c in candidates if c.stats.latency_samples > 0]
        if not warm:
            return self._fallback.choose("no-latency-samples", request, candidates)
        output_tokens = requested_output_tokens(request.body, self._default_output_tokens)
        return pick_uniform_minimum(warm, lambda endpoint: endpoint.stats.expected_latency(output_tokens), self._rng)
