"""vLLM's Prometheus metric names, labels and histogram buckets, in one place.

The simulator exports these and the gateway's scraper reads them; both import the names
from here so a rename in vLLM is a one-line change. Names are the sample names as they
appear in the ``/metrics`` text (counters with their ``_total`` suffix; histograms by
their base name, whose samples add ``_bucket``, ``_sum`` and ``_count``). Buckets are
vLLM v1's (``vllm/v1/metrics/loggers.py``), so histograms from a real engine and from the
simulator can be merged and compared bucket by bucket.
"""

from __future__ import annotations

# Labels every engine metric carries.
LABEL_MODEL_NAME = "model_name"
LABEL_ENGINE = "engine"
LABEL_FINISHED_REASON = "finished_reason"

# Gauges
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE_PERC = "vllm:kv_cache_usage_perc"
GPU_CACHE_USAGE_PERC = "vllm:gpu_cache_usage_perc"  # pre-0.10 name of KV_CACHE_USAGE_PERC
CACHE_CONFIG_INFO = "vllm:cache_config_info"
LORA_REQUESTS_INFO = "vllm:lora_requests_info"

# Labels of LORA_REQUESTS_INFO (it carries no model_name/engine; its value is a timestamp).
LABEL_MAX_LORA = "max_lora"
LABEL_RUNNING_LORA_ADAPTERS = "running_lora_adapters"
LABEL_WAITING_LORA_ADAPTERS = "waiting_lora_adapters"

# Counters
PREFIX_CACHE_QUERIES_TOTAL = "vllm:prefix_cache_queries_total"
PREFIX_CACHE_HITS_TOTAL = "vllm:prefix_cache_hits_total"
PROMPT_TOKENS_TOTAL = "vllm:prompt_tokens_total"
GENERATION_TOKENS_TOTAL = "vllm:generation_tokens_total"
REQUEST_SUCCESS_TOTAL = "vllm:request_success_total"
NUM_PREEMPTIONS_TOTAL = "vllm:num_preemptions_total"

# Histograms
TIME_TO_FIRST_TOKEN_SECONDS = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = "vllm:inter_token_latency_seconds"
TIME_PER_OUTPUT_TOKEN_SECONDS = "vllm:time_per_output_token_seconds"  # deprecated twin of the above
E2E_REQUEST_LATENCY_SECONDS = "vllm:e2e_request_latency_seconds"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"

TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def token_count_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to ``max_model_len``, used by the per-request token histograms."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(float(value))
        scale *= 10
