"""vLLM V1's FCFS scheduler: continuous batching with chunked prefill and recompute preemption.

There is no prefill or decode phase in V1: every request has ``num_computed_tokens`` and
the scheduler hands out a per-step token budget so that it catches up with the request's
tokens. Running requests go first, in admission order; if one cannot get KV blocks, the
most recently admitted running request is preempted (its blocks freed, to be recomputed
later) until it can. Waiting requests are admitted only in a step without preemptions,
while budget and ``max_num_seqs`` allow, each after a prefix-cache lookup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engines.core.kv_cache import KVCacheManager, RequestBlocks
from engines.core.latency import StepShape
from engines.core.types import FinishReason


@dataclass(slots=True, eq=False)
class RequestState:
    """A request inside the engine. Compared by identity, so queue removal stays cheap."""

    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    max_output_tokens: int  # the planned reply length
    finish_reason_at_max: FinishReason  # why the reply ends when it reaches that length
    token_state: int  # the generator state of the next output token
    blocks: RequestBlocks
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix hit at first scheduling; -1 until then, as in vLLM
    is_running: bool = False


@dataclass(slots=True)
class ScheduledStep:
    """What one ``schedule()`` call decided; requests' computed counts are already advanced."""

    requests: list[RequestState] = field(default_factory=list)
    shape: StepShape = field(default_factory=StepShape)
    num_preempted: int = 0


class Scheduler:
    """Decides, each step, which requests compute how many tokens; owns the run queues."""

    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.running: list[RequestState] = []
        self.waiting: deque[RequestState] = deque()
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    def add(self, request: RequestState) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self._schedule_running(step, self.max_num_batched_tokens)
        if not step.num_preempted:
            self._schedule_waiting(step, budget)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        kv_cache = self.kv_cache
        running = self.running
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            num_new_tokens = min(len(request.token_ids) - request.num_computed_tokens, budget)
            while not kv_cache.allocate(
                request.blocks, request.token_ids, request.num_computed_tokens, num_new_tokens
            ):
                victim = running.pop()
                self._preempt(victim)
                step.num_preempted += 1
                if victim is request:
                    return budget
            self._add_to_step(step, request, num_new_tokens)
            budget -= num_new_tokens
            index += 1
        return budget

    def _schedule_waiting(self, step: ScheduledStep, budget: int) -> None:
        kv_cache = self.kv_cache
        block_size = kv_cache.block_size
        waiting = self.waiting
        while waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = waiting[0]
            hit_blocks = kv_cache.find_cached_prefix(request.blocks, request.token_ids)
            num_hit_tokens = len(hit_blocks) * block_size
            num_new_tokens = min(len(request.token_ids) - num_hit_tokens, budget)
            if not kv_cache.allocate(request.blocks, request.token_ids, num_hit_tokens, num_new_tokens, hit_blocks):
                return  # FCFS: nothing behind the head may overtake it
            waiting.popleft()
            self.running.append(request)
            request.is_running = True
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if kv_cache.enable_prefix_caching:
                self.prefix_cache_queries += len(request.token_ids)
                self.prefix_cache_hits += num_hit_tokens
            self._add_to_step(step, request, num_new_tokens)
            budget -= num_new_tokens

    @staticmethod
    def _add_to_step(step: ScheduledStep, request: RequestState, num_new_tokens: int) -> None:
        computed = request.num_computed_tokens
        if num_new_tokens == 1 and computed >= request.num_prompt_tokens:
            step.shape.add_decode(computed + 1)
        else:
            step.shape.add_prefill_chunk(num_new_tokens, computed)
        request.num_computed_tokens = computed + num_new_tokens
        step.requests.append(request)

    def _preempt(self, request: RequestState) -> None:
        """Recompute preemption: drop the KV, requeue at the head; its tokens stay."""
        self.kv_cache.free(request.blocks)
        request.num_computed_tokens = 0
        request.is_running = False
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def remove_finished(self, finished: list[RequestState]) -> None:
        """Free finished running requests in one pass over the running list."""
        for request in finished:
            self.kv_cache.free(request.blocks)
            request.is_running = False
        self.running = [request for request in self.running if request.is_running]

    def remove(self, request: RequestState) -> None:
        """Take out one request wherever it is (an abort) and free its blocks at once."""
        if request.is_running:
            self.running.remove(request)
            self.kv_cache.free(request.blocks)
            request.is_running = False
        else:
            self.waiting.remove(request)
