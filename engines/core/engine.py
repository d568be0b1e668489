"""EngineCore: the clock-free heart of the simulated vLLM engine.

Each ``step()`` is one vLLM iteration: schedule, "run the model" (the latency model says
how long that would take), sample one token for every request whose scheduled tokens are
all computed, and retire finished requests. The caller owns time: it sleeps or advances a
virtual clock by ``StepResult.duration_s``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from engines.core.kv_cache import KVCacheManager, RequestBlocks
from engines.core.latency import step_ms
from engines.core.output_length import next_token, plan_output, request_seed
from engines.core.profiles import LLAMA_3_1_8B, ModelProfile, get_gpu_profile, kv_capacity_tokens
from engines.core.scheduler import RequestState, Scheduler
from engines.core.types import EngineRequest, EngineStats, FinishReason, RequestOutput, StepResult
from kvcache.hashing import DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED, BlockHasher, HashAlgo
from rayfleet.protocol.kv_events import KVEvent

# Called once per step that changed the cache, with that step's events in order (vLLM
# publishes one batch per scheduler step).
KVEventSink = Callable[[list[KVEvent]], None]


class EngineCoreConfig(BaseModel):
    """vLLM's engine flags that shape scheduling and the cache, plus the GPU to model."""

    model_config = ConfigDict(extra="forbid")

    gpu: str = "h100"
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    block_size: int = Field(16, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    num_gpu_blocks: int | None = Field(None, ge=1)  # overrides the memory-derived block count
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: HashAlgo = DEFAULT_HASH_ALGO
    # vLLM's PYTHONHASHSEED: the root of every block hash chain. None draws a random root,
    # as vLLM does without the variable, and then no other engine or gateway agrees.
    hash_seed: str | None = DEFAULT_HASH_SEED
    seed: int = 0


class EngineCore:
    """One engine's scheduler, KV cache and request table; driven one ``step()`` at a time."""

    def __init__(self, config: EngineCoreConfig, kv_event_sink: KVEventSink | None = None) -> None:
        model = LLAMA_3_1_8B
        self.config = config
        self.gpu = get_gpu_profile(config.gpu)
        self.num_gpu_blocks = config.num_gpu_blocks or (
            kv_capacity_tokens(self.gpu, model, config.gpu_memory_utilization, config.tensor_parallel_size)
            // config.block_size
        )
        if self.num_gpu_blocks < 1:
            raise ValueError(f"{model.name} leaves no memory for the KV cache on {self.gpu.name}")
        kv_capacity = self.num_gpu_blocks * config.block_size
        self.max_model_len = _resolve_max_model_len(config.max_model_len, model, kv_capacity)
        self._kv_event_sink = kv_event_sink
        self._kv_cache = KVCacheManager(
            self.num_gpu_blocks,
            BlockHasher(config.prefix_caching_hash_algo, config.hash_seed, config.block_size),
            config.enable_prefix_caching,
            record_events=kv_event_sink is not None,
        )
        self._scheduler = Scheduler(self._kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self._requests: dict[str, RequestState] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def add_request(self, request: EngineRequest) -> None:
        num_prompt_tokens = len(request.prompt_token_ids)
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        if (request.lora_id == 0) != (request.lora_name is None):
            raise ValueError("a LoRA request needs both lora_id and lora_name; the base model neither")
        if not 0 < num_prompt_tokens < self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens; it must have at least 1 and fewer than "
                f"max_model_len={self.max_model_len}"
            )
        plan = plan_output(request.sampling, request_seed(request.sampling, request.request_id, self.config.seed))
        state = RequestState(
            request_id=request.request_id,
            token_ids=list(request.prompt_token_ids),
            num_prompt_tokens=num_prompt_tokens,
            max_output_tokens=plan.num_tokens,
            finish_reason_at_max=plan.finish_reason,
            token_state=plan.token_state,
            blocks=RequestBlocks(lora_id=request.lora_id, lora_name=request.lora_name),
        )
        self._requests[request.request_id] = state
        self._scheduler.add(state)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        self._scheduler.remove(state)
        return _output(state, [], FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> StepResult:
        scheduled = self._scheduler.schedule()
        outputs: list[RequestOutput] = []
        finished: list[RequestState] = []
        max_model_len = self.max_model_len
        for state in scheduled.requests:
            token_ids = state.token_ids
            if state.num_computed_tokens < len(token_ids):
                continue  # a prefill chunk that does not reach the end samples nothing
            state.token_state, token_id = next_token(state.token_state)
            token_ids.append(token_id)
            num_output_tokens = len(token_ids) - state.num_prompt_tokens
            if num_output_tokens == 1:
                self._prompt_tokens += state.num_prompt_tokens
            reason = None
            if len(token_ids) >= max_model_len:
                reason = FinishReason.LENGTH
            elif num_output_tokens >= state.max_output_tokens:
                reason = state.finish_reason_at_max
            if reason is not None:
                finished.append(state)
                del self._requests[state.request_id]
            outputs.append(_output(state, [token_id], reason))
        self._generation_tokens += len(outputs)
        if finished:
            self._scheduler.remove_finished(finished)
        self._publish_kv_events()
        shape = scheduled.shape
        return StepResult(
            duration_s=step_ms(self.gpu, shape) / 1e3,
            outputs=outputs,
            num_prefill_tokens=shape.prefill_new_tokens,
            num_decode_tokens=shape.num_decode_seqs,
            num_preempted=scheduled.num_preempted,
        )

    def stats(self) -> EngineStats:
        scheduler = self._scheduler
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=self._kv_cache.usage,
            num_gpu_blocks=self.num_gpu_blocks,
            block_size=self.config.block_size,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            num_preemptions=scheduler.num_preemptions,
        )

    def reset_prefix_cache(self) -> bool:
        """vLLM's /reset_prefix_cache: refused while any request holds blocks."""
        reset = self._kv_cache.reset_prefix_cache()
        self._publish_kv_events()
        return reset

    def _publish_kv_events(self) -> None:
        if self._kv_event_sink is not None:
            events = self._kv_cache.take_events()
            if events:
                self._kv_event_sink(events)


def _resolve_max_model_len(requested: int | None, model: ModelProfile, kv_capacity: int) -> int:
    """The flag if it fits, else an error as vLLM gives; unset means the most that fits.

    vLLM refuses to start when one max-length sequence cannot fit in the KV cache, and
    ``--max-model-len auto`` picks the largest length that does; unset behaves like
    ``auto`` here so that small ``num_gpu_blocks`` overrides need no extra flag.
    """
    if requested is None:
        return min(model.max_model_len, kv_capacity)
    if requested > model.max_model_len:
        raise ValueError(f"max_model_len={requested} exceeds {model.name}'s limit of {model.max_model_len}")
    if requested > kv_capacity:
        raise ValueError(
            f"max_model_len={requested} needs more KV cache than the {kv_capacity} tokens available; "
            "lower max_model_len or raise gpu_memory_utilization"
        )
    return requested


def _output(state: RequestState, new_token_ids: list[int], reason: FinishReason | None) -> RequestOutput:
    return RequestOutput(
        request_id=state.request_id,
        new_token_ids=new_token_ids,
        finished=reason is not None,
        finish_reason=reason,
        num_prompt_tokens=state.num_prompt_tokens,
        num_cached_tokens=max(state.num_cached_tokens, 0),
        num_output_tokens=len(state.token_ids) - state.num_prompt_tokens,
    )
