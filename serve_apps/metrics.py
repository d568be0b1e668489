"""Gateway metrics through ``ray.util.metrics``, so they appear in the Ray dashboard.

Each call costs a few microseconds (measured: ~3 us per counter increment), cheap enough
to record per request. In-flight gauges are refreshed on a timer rather than per request.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class GatewayMetrics:
    """The gateway's own series: requests, errors, latency, in-flight per endpoint."""

    def __init__(self) -> None:
        self.requests = Counter(
            "rayfleet_gateway_requests_total",
            "Requests answered by the gateway, by model, endpoint, strategy and HTTP status.",
            tag_keys=("model", "endpoint", "strategy", "status"),
        )
        self.errors = Counter(
            "rayfleet_gateway_errors_total",
            "Requests that ended in an error, by model and reason.",
            tag_keys=("model", "reason"),
        )
        self.latency = Histogram(
            "rayfleet_gateway_request_latency_seconds",
            "Time from receiving a request to sending its last byte.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model",),
        )
        self.first_byte = Histogram(
            "rayfleet_gateway_time_to_first_byte_seconds",
            "Time from receiving a request to relaying the engine's first byte (TTFT for streams).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model",),
        )
        self.fallbacks = Counter(
            "rayfleet_gateway_routing_fallbacks_total",
            "Requests a strategy routed by least-request because its signal was missing or stale.",
            tag_keys=("strategy", "reason"),
        )
        self._published: dict[tuple[Counter, tuple[tuple[str, str], ...]], int] = {}
        self.index_lookups = Counter(
            "rayfleet_gateway_kv_index_lookups_total",
            "Prefix lookups in the KV-event index, by model and outcome: found (answered in budget) "
            "or missed (routed on the gateway's approximate index instead).",
            tag_keys=("model", "outcome"),
        )
        self.admissions = Counter(
            "rayfleet_gateway_admissions_total",
            "Rate-limit decisions, by outcome: admitted, rpm, tpm, unknown_user, unknown_key, "
            "store_error_open (admitted unchecked) or store_error_closed (refused with 503).",
            tag_keys=("outcome",),
        )
        self.in_flight = Gauge(
            "rayfleet_gateway_in_flight_requests",
            "Requests this gateway replica has in flight to each endpoint.",
            tag_keys=("endpoint",),
        )
        self.queued = Gauge(
            "rayfleet_gateway_queued_requests",
            "Requests this gateway replica holds until their model's pool, scaled to zero, has an engine.",
            tag_keys=("model",),
        )

    def record(self, model: str, endpoint: str, strategy: str, status: int, first_byte_s: float, total_s: float) -> None:
        self.requests.inc(1, {"model": model, "endpoint": endpoint, "strategy": strategy, "status": str(status)})
        model_tag = {"model": model}
        self.first_byte.observe(first_byte_s, model_tag)
        self.latency.observe(total_s, model_tag)

    def record_index_lookup(self, model: str, answered: bool) -> None:
        self.index_lookups.inc(1, {"model": model, "outcome": "found" if answered else "missed"})

    def record_error(self, model: str, reason: str) -> None:
        self.errors.inc(1, {"model": model or "-", "reason": reason})

    def publish_fallbacks(self, totals: dict[tuple[str, str], int]) -> None:
        """Turn the strategies' running totals into counter increments."""
        self._publish_deltas(self.fallbacks, {(("strategy", s), ("reason", r)): n for (s, r), n in totals.items()})

    def publish_admissions(self, totals: dict[str, int]) -> None:
        """Turn the limiter's running totals of decisions into counter increments."""
        self._publish_deltas(self.admissions, {(("outcome", outcome),): n for outcome, n in totals.items()})

    def _publish_deltas(self, counter: Counter, totals: dict[tuple[tuple[str, str], ...], int]) -> None:
        """Counters kept as plain ints on the request path reach Ray's metrics as increments."""
        for tags, total in totals.items():
            key = (counter, tags)
            delta = total - self._published.get(key, 0)
            if delta > 0:
                counter.inc(delta, dict(tags))
                self._published[key] = total

    def publish_in_flight(self, counts: dict[str, int]) -> None:
        for endpoint, count in counts.items():
            self.in_flight.set(count, {"endpoint": endpoint})

    def publish_queued(self, counts: dict[str, int]) -> None:
        for model, count in counts.items():
            self.queued.set(count, {"model": model})
