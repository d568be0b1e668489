"""A fast stand-in for ``engines.core.EngineCore`` in hour-long fleet simulations.

Why not ``engines.core.EngineCore`` as ``bench.fleet_sim`` uses: the evaluation replays
hour-long traces on up to 8 H100s, on the order of 10^8 generated tokens per run, and the
core costs about 3 µs of CPU per token (tens of minutes per run). ``BatchEngine``
keeps everything that sets the timing - vLLM V1's FCFS schedule (running requests first,
chunked prefill under ``max_num_batched_tokens``, admission up to ``max_num_seqs``) and the
calibrated step-time model of ``engines.core.latency`` on the H100 Llama-3.1-8B profile -
but keeps the batch as sums, so a step costs O(1) however many requests decode in it. It
reproduces ``EngineCore``'s step times and token times exactly (tests/test_bench_autoscale.py)
except under KV pressure: a request is admitted only when the KV blocks of its whole
prompt and reply are free (vLLM admits on the prompt and preempts when decoding runs out),
and prefixes are never shared (the traces carry no prompt text).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from bench.stats import RequestRecord
from engines.core.engine import EngineCoreConfig
from engines.core.latency import StepShape, step_ms
from engines.core.profiles import LLAMA_3_1_8B, get_gpu_profile, kv_capacity_tokens


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request inside a ``BatchEngine``; ``join`` is the step index of its first decode."""

    record: RequestRecord
    prompt: int
    output: int
    blocks: int = 0
    computed: int = 0
    join: int = 0


@dataclass(slots=True)
class StepOutcome:
    """One step: its modelled duration, the requests whose first token it produced and the
    requests it finished (a one-token request is in both)."""

    duration_s: float
    first_tokens: list[SimRequest]
    finished: list[SimRequest]


class BatchEngine:
    """vLLM V1's FCFS continuous batching with chunked prefill, kept as sums.

    Every decoding request gains one token per step, so a request that starts decoding at
    step ``join`` finishes at step ``join + output - 2`` (its first token came with its
    prefill) and the context the batch attends to at step ``s`` is
    ``sum(prompt + 1 - join) + decoding x s``: one heap entry per request and O(1) per step.
    At most one request is ever part-way through its prefill: the budget runs out on it,
    and the next step serves it before admitting anyone.
    """

    def __init__(self, config: EngineCoreConfig) -> None:
        if config.max_num_seqs > config.max_num_batched_tokens:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (vLLM requires it too)")
        self.gpu = get_gpu_profile(config.gpu)
        self.block_size = config.block_size
        self.num_blocks = config.num_gpu_blocks or (
            kv_capacity_tokens(self.gpu, LLAMA_3_1_8B, config.gpu_memory_utilization, config.tensor_parallel_size)
            // config.block_size
        )
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self._free_blocks = self.num_blocks
        self._waiting: deque[SimRequest] = deque()
        self._partial: SimRequest | None = None
        self._decoding: list[tuple[int, int, SimRequest]] = []  # (finishing step, tie-break, request)
        self._context_base = 0  # sum of (prompt + 1 - join) over the decoding requests
        self._step = 0
        self._sequence = 0

    @property
    def concurrency(self) -> int:
        """Running (decoding or prefilling) plus waiting requests."""
        return len(self._decoding) + (self._partial is not None) + len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._decoding or self._partial or self._waiting)

    def add(self, request: SimRequest) -> None:
        request.blocks = -(-(request.prompt + request.output) // self.block_size)
        if request.blocks > self.num_blocks:
            raise ValueError(
                f"a request of {request.prompt} + {request.output} tokens needs {request.blocks} KV blocks; "
                f"the engine has {self.num_blocks}"
            )
        self._waiting.append(request)

    def step(self) -> StepOutcome:
        shape = StepShape()
        step = self._step
        budget = self.max_num_batched_tokens
        decoding = len(self._decoding)
        if decoding:
            shape.num_decode_seqs = decoding
            shape.decode_context_tokens = self._context_base + decoding * step
            budget -= decoding
        running = decoding
        prefilled: list[SimRequest] = []
        partial = self._partial
        if partial is not None:
            running += 1
            self._partial = None
            budget = self._prefill(partial, budget, shape, prefilled)
        while self._waiting and budget > 0 and running < self.max_num_seqs:
            request = self._waiting[0]
            if request.blocks > self._free_blocks:
                break  # FCFS: nothing behind the head may overtake it
            self._waiting.popleft()
            self._free_blocks -= request.blocks
            running += 1
            budget = self._prefill(request, budget, shape, prefilled)

        finished: list[SimRequest] = []
        while self._decoding and self._decoding[0][0] == step:
            request = heapq.heappop(self._decoding)[2]
            self._context_base -= request.prompt + 1 - request.join
            self._release(request, finished)
        for request in prefilled:
            if request.output == 1:
                self._release(request, finished)
                continue
            request.join = step + 1
            self._context_base += request.prompt + 1 - request.join
            self._sequence += 1
            heapq.heappush(self._decoding, (request.join + request.output - 2, self._sequence, request))
        self._step += 1
        return StepOutcome(step_ms(self.gpu, shape) / 1e3, prefilled, finished)

    def _prefill(self, request: SimRequest, budget: int, shape: StepShape, prefilled: list[SimRequest]) -> int:
        """Give ``request`` as much of its remaining prompt as the budget allows."""
        chunk = min(request.prompt - request.computed, budget)
        shape.add_prefill_chunk(chunk, request.computed)
        request.computed += chunk
        if request.computed == request.prompt:
            prefilled.append(request)
        else:
            self._partial = request
        return budget - chunk

    def _release(self, request: SimRequest, finished: list[SimRequest]) -> None:
        self._free_blocks += request.blocks
        finished.append(request)
