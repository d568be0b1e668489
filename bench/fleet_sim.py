"""A discrete-event simulation of the gateway in front of a fleet of simulated engines.

It runs the very code the live stack runs, minus the sockets: the routing strategies of
``serve_apps.routing`` choose over ``EndpointState`` kept exactly as the gateway keeps it
(in-flight counts, gateway-measured stats, scraped engine metrics every
``scrape_interval_s``), and each engine is an ``engines.core.EngineCore``, the simulator's
scheduler, KV cache and latency model. Time is virtual: a step's modelled GPU duration
moves the clock, so an 8-engine H100 run of minutes takes seconds of CPU and gives the same
answer every time for the same seed.

What it leaves out, on purpose: network and gateway CPU time (sub-millisecond, measured
separately by ``rayfleet bench overhead``), and peers' routers (they only exist as
binaries, so they are compared in live runs).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.routing_workloads import RoutedRequest, RoutingWorkload
from bench.stats import RequestRecord
from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.tokenizer import BOS_TOKEN_ID
from engines.core.types import EngineRequest, SamplingSpec
from serve_apps.routing import RequestHooks, RoutingRequest, RoutingStrategy
from serve_apps.routing.base import EndpointState
from serve_apps.routing.session_affinity import SESSION_HEADER
from serve_apps.routing.signals import EngineMetrics

MODEL = "sim-model"
DEFAULT_SCRAPE_INTERVAL_S = 0.5  # the live scraper's default

StrategyFactory = Callable[[random.Random, Callable[[], float]], RoutingStrategy]

_ARRIVAL, _STEP_DONE, _SCRAPE = 0, 1, 2


@dataclass(slots=True)
class EngineCounters:
    """An engine's cumulative counters, as its ``/metrics`` would report them."""

    requests: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0

    def minus(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(
            self.requests - other.requests,
            self.prefix_queries - other.prefix_queries,
            self.prefix_hits - other.prefix_hits,
            self.preemptions - other.preemptions,
        )


@dataclass(slots=True)
class _Engine:
    core: EngineCore
    endpoint: EndpointState
    busy: bool = False
    finished: int = 0

    def counters(self) -> EngineCounters:
        stats = self.core.stats()
        return EngineCounters(self.finished, stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)


@dataclass(slots=True)
class _InFlight:
    record: RequestRecord
    routing: RoutingRequest
    engine: _Engine
    prompt_tokens: int


@dataclass(slots=True)
class FleetResult:
    """What a run measured: per-request records (engine seconds) and the engines' counters
    over the measured window (from the first measured send to the end)."""

    records: list[RequestRecord]
    engine_counters: list[EngineCounters] = field(default_factory=list)


class FleetSimulation:
    """One policy, one workload, a fresh fleet: ``run`` it once."""

    def __init__(
        self,
        num_engines: int,
        engine_config: EngineCoreConfig,
        strategy_factory: StrategyFactory,
        seed: int = 0,
        scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
    ) -> None:
        if num_engines < 1:
            raise ValueError(f"need at least one engine, got {num_engines}")
        self.now = 0.0
        self._engines = [
            _Engine(
                EngineCore(engine_config.model_copy(update={"seed": engine_config.seed + i})),
                EndpointState(name=f"engine-{i}", url=f"sim://engine-{i}"),
            )
            for i in range(num_engines)
        ]
        self._endpoints = [engine.endpoint for engine in self._engines]
        self._strategy = strategy_factory(random.Random(seed), lambda: self.now)
        self._hooks = self._strategy if isinstance(self._strategy, RequestHooks) else None
        self._scrape_interval_s = scrape_interval_s
        self._events: list[tuple[float, int, int, object]] = []
        self._sequence = 0
        self._in_flight: dict[str, _InFlight] = {}

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (at, self._sequence, kind, payload))

    def run(self, workload: RoutingWorkload, measure_from_s: float = 0.0) -> FleetResult:
        """Send every request of ``workload`` and run until the last one finishes.

        Engine counters are snapshotted at ``measure_from_s`` so hit rate and balance
        exclude the warm-up, like the latency statistics do.
        """
        records: list[RequestRecord] = []
        for request in workload.requests:
            self._push(request.send_at, _ARRIVAL, request)
        self._push(0.0, _SCRAPE, None)
        baseline: list[EngineCounters] | None = None
        pending = len(workload.requests)
        while self._events and (pending or self._in_flight):
            at, _, kind, payload = heapq.heappop(self._events)
            if baseline is None and at >= measure_from_s:
                baseline = [engine.counters() for engine in self._engines]
            self.now = at
            if kind == _ARRIVAL:
                pending -= 1
                records.append(self._arrive(payload))  # type: ignore[arg-type]
            elif kind == _STEP_DONE:
                self._step_done(payload)  # type: ignore[arg-type]
            else:
                self._scrape()
        baseline = baseline or [engine.counters() for engine in self._engines]
        counters = [engine.counters().minus(base) for engine, base in zip(self._engines, baseline)]
        return FleetResult(sorted(records, key=lambda r: r.index), counters)

    def _scrape(self) -> None:
        for engine in self._engines:
            stats = engine.core.stats()
            engine.endpoint.on_scrape(EngineMetrics(
                scraped_at=self.now,
                num_requests_running=stats.num_running,
                num_requests_waiting=stats.num_waiting,
                kv_cache_usage=stats.kv_cache_usage,
            ))
        self._push(self.now + self._scrape_interval_s, _SCRAPE, None)

    def _arrive(self, request: RoutedRequest) -> RequestRecord:
        prompt = [BOS_TOKEN_ID, *request.token_ids]
        headers = {SESSION_HEADER: request.session} if request.session else {}
        routing = RoutingRequest(
            model=MODEL,
            path="/v1/completions",
            body={"model": MODEL, "prompt": prompt, "max_tokens": request.max_tokens, "seed": request.seed},
            headers=headers,
            derived={"prompt_token_ids": prompt},
        )
        endpoint = self._strategy.choose(routing, self._endpoints)
        engine = self._engines[self._endpoints.index(endpoint)]
        if self._hooks is not None:
            self._hooks.on_request_start(routing)
        endpoint.on_dispatch(self.now)
        record = RequestRecord(index=request.index, scheduled=request.send_at, sent=self.now, status=200)
        request_id = str(request.index)
        engine.core.add_request(
            EngineRequest(
                request_id,
                prompt,
                SamplingSpec(max_tokens=request.max_tokens, ignore_eos=True, seed=request.seed),
                arrival_time=self.now,
            )
        )
        self._in_flight[request_id] = _InFlight(record, routing, engine, len(prompt))
        if not engine.busy:
            self._start_step(engine)
        return record

    def _start_step(self, engine: _Engine) -> None:
        result = engine.core.step()
        engine.busy = True
        self._push(self.now + result.duration_s, _STEP_DONE, (engine, result.outputs))

    def _step_done(self, payload: tuple[_Engine, list]) -> None:
        engine, outputs = payload
        for output in outputs:
            flight = self._in_flight[output.request_id]
            record = flight.record
            record.token_times.append(self.now)
            record.output_tokens = output.num_output_tokens
            if output.finished:
                self._finish(output.request_id, flight)
        engine.busy = False
        if engine.core.has_unfinished_requests():
            self._start_step(engine)

    def _finish(self, request_id: str, flight: _InFlight) -> None:
        del self._in_flight[request_id]
        record = flight.record
        record.end = self.now
        record.prompt_tokens = flight.prompt_tokens
        flight.engine.endpoint.on_finish(self.now, flight.prompt_tokens, record.output_tokens, record.ttft, record.e2e)
        flight.engine.finished += 1
        if self._hooks is not None:
            self._hooks.on_request_finish(flight.routing, flight.prompt_tokens, record.output_tokens)
