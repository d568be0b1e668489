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
from typing import Literal

from bench.routing_workloads import RoutedRequest, RoutingWorkload
from bench.stats import RequestRecord
from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.tokenizer import BOS_TOKEN_ID
from engines.core.types import EngineRequest, SamplingSpec
from kvcache.index import BlockIndex, match_in, op_of_event
from rayfleet.protocol.kv_events import KVEvent
from serve_apps.routing import RequestHooks, RoutingRequest, RoutingStrategy
from serve_apps.routing._prefix_common import INDEXED_MATCHES_KEY
from serve_apps.routing.base import PREFILL_ESTIMATE_KEY, EndpointState
from serve_apps.routing.prompt_blocks import block_hashes
from serve_apps.routing.session_affinity import SESSION_HEADER
from serve_apps.routing.signals import EngineMetrics

MODEL = "sim-model"
DEFAULT_SCRAPE_INTERVAL_S = 0.5  # the live scraper's default

PrefixIndexMode = Literal["approximate", "events"]
# Ample for any fleet simulated here (8 H100 engines cache ~200k blocks between them).
_INDEX_BLOCKS = 10_000_000

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
    name: str
    busy: bool = False
    finished: int = 0
    # KV events of the step in progress: vLLM publishes them when the step is done.
    pending_events: list[KVEvent] = field(default_factory=list)

    def counters(self) -> EngineCounters:
        stats = self.core.stats()
        return EngineCounters(self.finished, stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)


@dataclass(slots=True)
class _Replica:
    """One gateway replica: its own strategy instances (so its own approximate prefix
    index and counters) and its own view of the endpoints (its own in-flight counts), as
    replicas behind a load balancer have; only scraped engine metrics are common."""

    strategy: RoutingStrategy
    endpoints: list[EndpointState]
    hooks: RequestHooks | None


@dataclass(slots=True)
class _InFlight:
    record: RequestRecord
    routing: RoutingRequest
    engine: _Engine
    replica: _Replica
    endpoint: EndpointState
    prompt_tokens: int
    prefill_tokens: int  # the strategy's estimate, held in the endpoint's backlog until the first token


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
        prefix_index: PrefixIndexMode = "approximate",
        gateway_replicas: int = 1,
    ) -> None:
        if num_engines < 1 or gateway_replicas < 1:
            raise ValueError(f"need at least one engine and one gateway replica, got {num_engines}, {gateway_replicas}")
        self.now = 0.0
        # ``events``: prefix strategies read what the engines' KV events say they hold
        # (one index shared by every replica, events applied when each step ends);
        # ``approximate``: each replica's own routing history.
        self._kv_index = BlockIndex(_INDEX_BLOCKS) if prefix_index == "events" else None
        self._engines = []
        for i in range(num_engines):
            pending: list[KVEvent] = []
            core = EngineCore(
                engine_config.model_copy(update={"seed": engine_config.seed + i}),
                kv_event_sink=pending.extend if self._kv_index is not None else None,
            )
            self._engines.append(_Engine(core, f"engine-{i}", pending_events=pending))
        self._replicas = []
        for replica in range(gateway_replicas):
            strategy = strategy_factory(random.Random(seed * 1_000_003 + replica), lambda: self.now)
            endpoints = [EndpointState(name=engine.name, url=f"sim://{engine.name}") for engine in self._engines]
            self._replicas.append(_Replica(strategy, endpoints, strategy if isinstance(strategy, RequestHooks) else None))
        self._names = [engine.name for engine in self._engines]
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
        for index, engine in enumerate(self._engines):
            stats = engine.core.stats()
            metrics = EngineMetrics(
                scraped_at=self.now,
                num_requests_running=stats.num_running,
                num_requests_waiting=stats.num_waiting,
                kv_cache_usage=stats.kv_cache_usage,
            )
            for replica in self._replicas:
                replica.endpoints[index].on_scrape(metrics)
        self._push(self.now + self._scrape_interval_s, _SCRAPE, None)

    def _arrive(self, request: RoutedRequest) -> RequestRecord:
        # Replicas take requests in turn, as a round-robin load balancer deals them out.
        replica = self._replicas[request.index % len(self._replicas)]
        prompt = [BOS_TOKEN_ID, *request.token_ids]
        headers = {SESSION_HEADER: request.session} if request.session else {}
        routing = RoutingRequest(
            model=MODEL,
            path="/v1/completions",
            body={"model": MODEL, "prompt": prompt, "max_tokens": request.max_tokens, "seed": request.seed},
            headers=headers,
            derived={"prompt_token_ids": prompt},
        )
        hasher = getattr(replica.strategy, "hasher", None)
        if self._kv_index is not None and hasher is not None:
            hashes = block_hashes(routing, hasher)
            routing.derived[INDEXED_MATCHES_KEY] = (hasher.memo_key, match_in(self._kv_index, hashes, self._names))
        endpoint = replica.strategy.choose(routing, replica.endpoints)
        engine = self._engines[replica.endpoints.index(endpoint)]
        if replica.hooks is not None:
            replica.hooks.on_request_start(routing)
        prefill = routing.derived.get(PREFILL_ESTIMATE_KEY, 0)
        endpoint.on_dispatch(self.now, prefill)
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
        self._in_flight[request_id] = _InFlight(record, routing, engine, replica, endpoint, len(prompt), prefill)
        if not engine.busy:
            self._start_step(engine)
        return record

    def _start_step(self, engine: _Engine) -> None:
        result = engine.core.step()
        engine.busy = True
        self._push(self.now + result.duration_s, _STEP_DONE, (engine, result.outputs))

    def _step_done(self, payload: tuple[_Engine, list]) -> None:
        engine, outputs = payload
        if self._kv_index is not None and engine.pending_events:
            ops = [op_of_event(event) for event in engine.pending_events]
            self._kv_index.apply(engine.name, ops, self.now)
            engine.pending_events.clear()
        for output in outputs:
            flight = self._in_flight[output.request_id]
            record = flight.record
            record.token_times.append(self.now)
            record.output_tokens = output.num_output_tokens
            if output.num_output_tokens == 1:
                flight.endpoint.on_first_token(flight.prefill_tokens)
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
        flight.endpoint.on_finish(self.now, flight.prompt_tokens, record.output_tokens, record.ttft, record.e2e)
        flight.engine.finished += 1
        if flight.replica.hooks is not None:
            flight.replica.hooks.on_request_finish(flight.routing, flight.prompt_tokens, record.output_tokens)
