"""``/metrics`` in vLLM's Prometheus names and labels, from the simulated engine's state.

Two sources feed it. Scheduler gauges and token counters come straight from the core's
``EngineStats`` (cumulative since start, exactly what vLLM's counters hold), read when
Prometheus scrapes, so stepping the engine costs nothing for them. Per-request latencies
are observed by the engine loop as outputs are delivered, into small bucket arrays rather
than ``prometheus_client.Histogram`` objects: one observation is a bisect and two adds,
and the same array serves vLLM's two names for inter-token latency.

Latency histograms are in ENGINE time: a wall-clock interval divided by the time scale
(when it is above 0). A simulator slowed down 10x for a test therefore still reports the
TTFT and ITL the modelled GPU would have, which is what autoscaling and routing policies
must see; at time scale 0 the raw wall interval is reported.

Each server has its own ``CollectorRegistry``, so several simulators in one process (as in
tests) never collide on metric names.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engines.core.types import EngineStats, FinishReason
from rayfleet.protocol import vllm_metrics as names


@dataclass(slots=True)
class BucketHistogram:
    """Counts per bucket (the last one is +Inf) and the sum of observed values."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str, labels: list[str], label_values: list[str]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(label_values, buckets, self.total)
        return family


class RequestMetrics:
    """Per-request observations: latencies in engine seconds, token counts, finish reasons."""

    def __init__(self, max_model_len: int) -> None:
        token_buckets = names.token_count_buckets(max_model_len)
        self.time_to_first_token = BucketHistogram(names.TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = BucketHistogram(names.INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_latency = BucketHistogram(names.REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = BucketHistogram(token_buckets)
        self.generation_tokens = BucketHistogram(token_buckets)
        self.finished: dict[str, int] = {reason.value: 0 for reason in FinishReason}

    def observe_finished(
        self, reason: FinishReason, e2e_seconds: float, num_prompt_tokens: int, num_generation_tokens: int
    ) -> None:
        self.finished[reason.value] += 1
        self.e2e_latency.observe(e2e_seconds)
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_generation_tokens)

    def observe_aborted(self) -> None:
        self.finished[FinishReason.ABORT.value] += 1


@dataclass(slots=True, frozen=True)
class LoraActivity:
    """Adapters with requests in the engine, split as vLLM's ``lora_requests_info`` splits them."""

    running: list[str]
    waiting: list[str]


class SimulatorCollector(Collector):
    """Renders every metric family at scrape time."""

    def __init__(
        self,
        model_name: str,
        requests: RequestMetrics,
        stats: Callable[[], EngineStats],
        cache_config: dict[str, str],
        max_loras: int | None,
        lora_activity: Callable[[], LoraActivity],
    ) -> None:
        self._labels = [names.LABEL_MODEL_NAME, names.LABEL_ENGINE]
        self._values = [model_name, "0"]
        self._requests = requests
        self._stats = stats
        self._cache_config = cache_config
        self._max_loras = max_loras  # None when LoRA is disabled: vLLM then omits lora_requests_info
        self._lora_activity = lora_activity

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield self._gauge(
            names.NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.", stats.num_running
        )
        yield self._gauge(names.NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", stats.num_waiting)
        yield self._gauge(names.KV_CACHE_USAGE_PERC, "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage)
        yield self._gauge(
            names.GPU_CACHE_USAGE_PERC,
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            stats.kv_cache_usage,
        )
        yield self._counter(
            names.PREFIX_CACHE_QUERIES_TOTAL,
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )
        yield self._counter(
            names.PREFIX_CACHE_HITS_TOTAL,
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )
        yield self._counter(names.PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.", stats.prompt_tokens)
        yield self._counter(
            names.GENERATION_TOKENS_TOTAL, "Number of generation tokens processed.", stats.generation_tokens
        )
        yield self._counter(
            names.NUM_PREEMPTIONS_TOTAL, "Cumulative number of preemption from the engine.", stats.num_preemptions
        )
        yield self._request_success()
        yield from self._histograms()
        yield self._cache_config_info()
        if self._max_loras is not None:
            yield self._lora_requests_info()

    def _gauge(self, name: str, documentation: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, documentation, labels=self._labels)
        family.add_metric(self._values, value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=self._labels)
        family.add_metric(self._values, value)
        return family

    def _request_success(self) -> Metric:
        family = CounterMetricFamily(
            names.REQUEST_SUCCESS_TOTAL,
            "Count of successfully processed requests.",
            labels=[*self._labels, names.LABEL_FINISHED_REASON],
        )
        for reason, count in self._requests.finished.items():
            family.add_metric([*self._values, reason], count)
        return family

    def _histograms(self) -> Iterator[Metric]:
        requests, labels, values = self._requests, self._labels, self._values
        yield requests.time_to_first_token.family(
            names.TIME_TO_FIRST_TOKEN_SECONDS, "Histogram of time to first token in seconds.", labels, values
        )
        yield requests.inter_token_latency.family(
            names.INTER_TOKEN_LATENCY_SECONDS, "Histogram of inter-token latency in seconds.", labels, values
        )
        yield requests.inter_token_latency.family(
            names.TIME_PER_OUTPUT_TOKEN_SECONDS,
            "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            labels,
            values,
        )
        yield requests.e2e_latency.family(
            names.E2E_REQUEST_LATENCY_SECONDS, "Histogram of e2e request latency in seconds.", labels, values
        )
        yield requests.prompt_tokens.family(
            names.REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.", labels, values
        )
        yield requests.generation_tokens.family(
            names.REQUEST_GENERATION_TOKENS, "Number of generation tokens processed.", labels, values
        )

    def _cache_config_info(self) -> Metric:
        info = {**self._cache_config, names.LABEL_ENGINE: "0"}
        family = GaugeMetricFamily(
            names.CACHE_CONFIG_INFO, "Information of the LLMEngine CacheConfig", labels=list(info)
        )
        family.add_metric(list(info.values()), 1)
        return family

    def _lora_requests_info(self) -> Metric:
        """vLLM's info gauge: adapters as comma-joined labels, the value the time of the reading."""
        activity = self._lora_activity()
        family = GaugeMetricFamily(
            names.LORA_REQUESTS_INFO,
            "Running stats on lora requests.",
            labels=[names.LABEL_MAX_LORA, names.LABEL_WAITING_LORA_ADAPTERS, names.LABEL_RUNNING_LORA_ADAPTERS],
        )
        family.add_metric([str(self._max_loras), ",".join(activity.waiting), ",".join(activity.running)], time.time())
        return family


class MetricsEndpoint:
    """A private registry around one collector, rendered as Prometheus text."""

    def __init__(self, collector: SimulatorCollector) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self._registry)
