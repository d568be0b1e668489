"""The asyncio driver of the clock-free engine core: it turns modelled GPU time into wall time.

One task owns the core. While there is work it calls ``step()``, waits the step's
modelled duration times the time scale, then hands each request its outputs. Waiting is
against a cumulative target (start of the busy period + the sum of scaled durations), not
step by step, so Python overhead between steps does not add up as drift: if the loop
falls behind it simply runs the next step without sleeping until it has caught up. It
always yields to the event loop between steps (time scale 0 included), so HTTP handlers
keep admitting requests while the engine is busy. When the core is idle the task sleeps
on an event that ``submit`` sets.

Streaming handlers get every output that carries tokens; other handlers get only the
final one, the loop having gathered the tokens for them, so a non-streamed request wakes
its handler once however long the reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.core.engine import EngineCore
from engines.core.types import EngineRequest, RequestOutput
from engines.simulator.metrics import LoraActivity, RequestMetrics


@dataclass(slots=True)
class RequestHandle:
    """A request in flight, as seen by the HTTP handler waiting on ``outputs``."""

    request_id: str
    stream: bool
    lora_name: str | None
    num_prompt_tokens: int
    arrival: float  # perf_counter() at admission
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)  # every token generated so far
    scheduled: bool = False  # has produced a token: "running" rather than "waiting" in lora_requests_info
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class EngineLoop:
    """Owns the core and the task that steps it."""

    def __init__(
        self,
        core: EngineCore,
        time_scale: float,
        metrics: RequestMetrics,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._core = core
        self._time_scale = time_scale
        # Wall seconds -> engine seconds for latency metrics (see metrics.py).
        self._engine_seconds_per_wall_second = 1.0 / time_scale if time_scale > 0 else 1.0
        self._metrics = metrics
        self._on_failure = on_failure
        self._handles: dict[str, RequestHandle] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def core(self) -> EngineCore:
        return self._core

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")
        self._task.add_done_callback(self._report_failure)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.remove_done_callback(self._report_failure)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    def submit(self, request: EngineRequest, stream: bool, lora_name: str | None) -> RequestHandle:
        request.arrival_time = time.perf_counter()
        handle = RequestHandle(
            request_id=request.request_id,
            stream=stream,
            lora_name=lora_name,
            num_prompt_tokens=len(request.prompt_token_ids),
            arrival=request.arrival_time,
        )
        self._core.add_request(request)
        self._handles[request.request_id] = handle
        self._wakeup.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Drop a request whose client went away; a no-op once it has finished."""
        if self._handles.pop(handle.request_id, None) is None:
            return
        self._core.abort_request(handle.request_id)
        self._metrics.observe_aborted()

    def lora_activity(self) -> LoraActivity:
        running: set[str] = set()
        waiting: set[str] = set()
        for handle in self._handles.values():
            if handle.lora_name is not None:
                (running if handle.scheduled else waiting).add(handle.lora_name)
        return LoraActivity(running=sorted(running), waiting=sorted(waiting))

    async def _run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution, too coarse
        # for latencies that get multiplied back up by 1 / time_scale.
        clock = time.perf_counter
        core = self._core
        time_scale = self._time_scale
        origin = clock()
        scaled_elapsed = 0.0
        while True:
            if not core.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                origin = clock()
                scaled_elapsed = 0.0
            result = core.step()
            if time_scale > 0:
                scaled_elapsed += result.duration_s * time_scale
                delay = origin + scaled_elapsed - clock()
                await asyncio.sleep(delay if delay > 0 else 0)
            else:
                await asyncio.sleep(0)
            if result.outputs:
                self._deliver(result.outputs, clock())

    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        handles = self._handles
        metrics = self._metrics
        to_engine = self._engine_seconds_per_wall_second
        for output in outputs:
            handle = handles.get(output.request_id)
            if handle is None:  # aborted while its step was in flight
                continue
            handle.scheduled = True
            new_token_ids = output.new_token_ids
            if new_token_ids:
                if handle.first_token_at:
                    metrics.inter_token_latency.observe((now - handle.last_token_at) * to_engine)
                else:
                    handle.first_token_at = now
                    metrics.time_to_first_token.observe((now - handle.arrival) * to_engine)
                handle.last_token_at = now
                handle.token_ids += new_token_ids
            if output.finished:
                del handles[output.request_id]
                e2e = (now - handle.arrival) * to_engine
                metrics.observe_finished(output.finish_reason, e2e, handle.num_prompt_tokens, len(handle.token_ids))
                handle.outputs.put_nowait(output)
            elif new_token_ids and handle.stream:
                handle.outputs.put_nowait(output)

    def _report_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._on_failure(task.exception())
