"""Plain data exchanged between the simulated engine core and whatever drives it.

The core is clock-free: ``EngineCore.step()`` returns how long the step would take on the
GPU, and the driver decides what to do with that number. The HTTP simulator sleeps for it
(times a time-scale factor); the discrete-event benchmarks advance a virtual clock by it.
That is why nothing in here knows about asyncio or wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Why a request left the engine, with vLLM's wire values."""

    STOP = "stop"  # reached its natural (sampled) end, like an EOS token
    LENGTH = "length"  # reached max_tokens or the model's context limit
    ABORT = "abort"  # the client went away or the request was cancelled


@dataclass(slots=True)
class SamplingSpec:
    """What the core needs from the request's sampling parameters.

    ``max_tokens`` is already resolved (vLLM's default is ``max_model_len - prompt_len``).
    The output length is ``max_tokens`` when ``ignore_eos`` is set; otherwise it is drawn
    from the simulator's output-length distribution, seeded by ``seed`` (or the request id),
    and then clamped to ``[min_tokens, max_tokens]``.
    """

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(slots=True)
class EngineRequest:
    """A request as the core sees it: token ids in, token ids out."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    lora_id: int = 0  # 0 = base model; adapters get 1, 2, ... (reported in KV events)
    lora_name: str | None = None  # the adapter's name: vLLM's extra key in block hashes
    arrival_time: float = 0.0  # in the driver's clock; only used for FCFS order and stats


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled in this step (empty while still prefilling)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (vLLM's usage field)
    num_output_tokens: int = 0  # total generated so far


@dataclass(slots=True)
class StepResult:
    """One engine iteration: its modelled duration on the GPU and its outputs."""

    duration_s: float  # modelled GPU time of this step, in engine seconds
    outputs: list[RequestOutput] = field(default_factory=list)
    num_prefill_tokens: int = 0  # uncached prompt tokens computed in this step
    num_decode_tokens: int = 0  # sequences that decoded one token in this step
    num_preempted: int = 0


@dataclass(slots=True)
class EngineStats:
    """Scheduler and cache state, read by the metrics exporter after each step.

    Counters are cumulative since engine start, in the units vLLM uses for the
    Prometheus metric of the same meaning.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1 (vllm:kv_cache_usage_perc)
    num_gpu_blocks: int = 0
    block_size: int = 16
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # prompt tokens found there
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
