"""A discrete-event simulation of a fleet of engines under an autoscaling policy.

The policies are the very objects the live autoscaler drives (``autoscaling.build_policy``):
every second of virtual time the fleet's concurrency (running + waiting requests, summed
over the ready replicas) is fed to ``observe`` (Knative's one-second metric buckets; HPA
keeps the latest reading), and every ``policy.sync_period`` seconds ``recommend(now,
current, ready)`` is asked for a count and the decision is applied at once: a scale-up
starts cold replicas that become routable only after the cold-start delay, a scale-down
removes the newest replicas, which drain (no new requests, running ones finish) before they
stop. Replicas are paid from the scale-up decision to the end of their drain. Requests go to
the ready replica with the fewest in flight (``least-request``, the gateway's own strategy).

Engines are ``bench.batch_engine.BatchEngine``: vLLM's schedule and step-time model kept as
sums, fast enough for hour-long traces (its docstring says what it leaves out).
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise

from autoscaling import MetricSource, Observation, PodAutoscalerSpec, ScaleTargetRef, ScalingPolicy
from autoscaling.spec import ScalingStrategy
from bench.autoscale_workloads import AutoscaleWorkload, constant_workload
from bench.batch_engine import BatchEngine, SimRequest, StepOutcome
from bench.stats import RequestRecord, Slo, compute_metrics
from bench.workloads import LengthPool
from engines.core.engine import EngineCoreConfig
from serve_apps.routing import build_strategy
from serve_apps.routing.base import EndpointState, RoutingRequest

MODEL = "autoscale-model"
# Running + waiting requests of a pod, vLLM's num_requests_running + num_requests_waiting:
# the requests a replica holds, which is what Knative's concurrency autoscaling counts.
CONCURRENCY_METRIC = "concurrency"
SAMPLE_INTERVAL_S = 1.0  # Knative's metric bucket and scrape tick


def autoscaler_spec(
    strategy: ScalingStrategy, min_replicas: int, max_replicas: int, target: float
) -> PodAutoscalerSpec:
    """One ``pod`` source: ``target`` concurrent requests per replica. KPA sums it over the
    ready pods (Knative's revision concurrency); HPA and APA compare the per-pod average."""
    return PodAutoscalerSpec(
        scaleTargetRef=ScaleTargetRef(kind="EnginePool", name=MODEL),
        minReplicas=min_replicas,
        maxReplicas=max_replicas,
        metricsSources=[MetricSource(metricSourceType="pod", targetMetric=CONCURRENCY_METRIC, targetValue=target)],
        scalingStrategy=strategy,
    )


# ---------------------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------------------


class ReplicaState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(slots=True, eq=False)
class Replica:
    """One replica's life: it costs from ``started_at`` to ``stopped_at`` (or the run's end),
    draining from ``removed_at``, when a scale-down chose it, to ``stopped_at``."""

    name: str
    engine: BatchEngine
    endpoint: EndpointState
    started_at: float
    ready_at: float
    state: ReplicaState
    removed_at: float | None = None
    stopped_at: float | None = None
    first_request_at: float | None = None
    requests: int = 0
    busy: bool = False

    def cost(self, end_s: float) -> float:
        return (end_s if self.stopped_at is None else self.stopped_at) - self.started_at


@dataclass(slots=True)
class Timeline:
    """The fleet, sampled every second: what the autoscaler saw and what it had."""

    times: list[float] = field(default_factory=list)
    concurrency: list[int] = field(default_factory=list)  # over the ready replicas
    ready: list[int] = field(default_factory=list)
    current: list[int] = field(default_factory=list)  # starting + ready: the count the policy is told
    desired: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A change of the desired count."""

    at: float
    previous: int
    desired: int


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    timeline: Timeline
    scale_events: list[ScaleEvent]
    replicas: list[Replica]
    end_s: float  # the later of the workload's end and the last request's completion

    @property
    def replica_seconds(self) -> float:
        return sum(replica.cost(self.end_s) for replica in self.replicas)


@dataclass(frozen=True, slots=True)
class FleetBounds:
    min_replicas: int
    max_replicas: int
    initial: int
    cold_start_s: float


# Event kinds, in the order events at the same instant are handled: finished steps free
# capacity before arrivals are routed, and the autoscaler samples and decides last.
_STEP_DONE, _ARRIVAL, _READY, _SAMPLE, _SYNC = range(5)


class AutoscaleSimulation:
    """One policy (None: a fixed fleet of ``bounds.initial``), one workload: ``run`` it once."""

    def __init__(
        self,
        workload: AutoscaleWorkload,
        engine_config: EngineCoreConfig,
        policy: ScalingPolicy | None,
        bounds: FleetBounds,
        seed: int = 0,
    ) -> None:
        self.now = 0.0
        self._workload = workload
        self._engine_config = engine_config
        self._policy = policy
        self._bounds = bounds
        self._strategy = build_strategy("least-request", random.Random(seed), lambda: self.now)
        self._events: list[tuple[float, int, int, object]] = []
        self._sequence = 0
        self._replicas: list[Replica] = []
        self._routable: list[EndpointState] = []
        self._by_endpoint: dict[str, Replica] = {}
        self._desired = bounds.initial
        self._scale_events: list[ScaleEvent] = []
        self._timeline = Timeline()
        self._in_flight = 0

    def _push(self, at: float, kind: int, payload: object = None) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (at, kind, self._sequence, payload))

    def run(self) -> RunResult:
        requests = self._workload.requests
        records = [
            RequestRecord(index=i, scheduled=r.send_at, sent=r.send_at, status=200) for i, r in enumerate(requests)
        ]
        for _ in range(self._bounds.initial):
            self._start_replica(ready=True)
        if requests:
            self._push(requests[0].send_at, _ARRIVAL, 0)
        self._push(0.0, _SAMPLE)
        if self._policy is not None:
            self._push(0.0, _SYNC)
        arrived = 0
        last_end = 0.0
        while self._events:
            at, kind, _, payload = heapq.heappop(self._events)
            if kind >= _SAMPLE and arrived == len(requests) and not self._in_flight and at >= self._workload.duration_s:
                break
            self.now = at
            if kind == _STEP_DONE:
                last_end = self._step_done(payload)  # type: ignore[arg-type]
            elif kind == _ARRIVAL:
                index: int = payload  # type: ignore[assignment]
                self._arrive(records[index], requests[index].lengths.prompt, requests[index].lengths.output)
                arrived += 1
                if arrived < len(requests):
                    self._push(requests[arrived].send_at, _ARRIVAL, arrived)
            elif kind == _READY:
                self._ready(payload)  # type: ignore[arg-type]
            elif kind == _SAMPLE:
                self._sample()
            else:
                self._sync()
        end_s = max(self._workload.duration_s, last_end)
        return RunResult(records, self._timeline, self._scale_events, self._replicas, end_s)

    # -- replicas ---------------------------------------------------------------------

    def _start_replica(self, ready: bool) -> None:
        name = f"replica-{len(self._replicas)}"
        ready_at = self.now if ready else self.now + self._bounds.cold_start_s
        replica = Replica(
            name, BatchEngine(self._engine_config), EndpointState(name=name, url=f"sim://{name}"), self.now, ready_at,
            ReplicaState.READY if ready else ReplicaState.STARTING,
        )  # fmt: skip
        self._replicas.append(replica)
        self._by_endpoint[name] = replica
        if ready:
            self._routable.append(replica.endpoint)
        else:
            self._push(ready_at, _READY, replica)

    def _ready(self, replica: Replica) -> None:
        if replica.state is ReplicaState.STARTING:  # not removed while it booted
            replica.state = ReplicaState.READY
            self._routable.append(replica.endpoint)

    def _live(self) -> list[Replica]:
        """Starting and ready replicas, oldest first: what the scale target counts."""
        return [r for r in self._replicas if r.state in (ReplicaState.STARTING, ReplicaState.READY)]

    def _scale_to(self, desired: int) -> None:
        live = self._live()
        for _ in range(desired - len(live)):
            self._start_replica(ready=False)
        for replica in reversed(live[desired:]):  # the newest go first
            if replica.state is ReplicaState.READY:
                self._routable.remove(replica.endpoint)
            replica.state = ReplicaState.DRAINING
            replica.removed_at = self.now
            self._stop_if_drained(replica)

    def _stop_if_drained(self, replica: Replica) -> None:
        if replica.state is ReplicaState.DRAINING and not replica.busy and not replica.engine.has_work():
            replica.state = ReplicaState.STOPPED
            replica.stopped_at = self.now

    # -- requests ---------------------------------------------------------------------

    def _arrive(self, record: RequestRecord, prompt: int, output: int) -> None:
        routing = RoutingRequest(model=MODEL, path="/v1/completions", body={})
        endpoint = self._strategy.choose(routing, self._routable)
        replica = self._by_endpoint[endpoint.name]
        endpoint.on_dispatch(self.now)
        replica.requests += 1
        if replica.first_request_at is None:
            replica.first_request_at = self.now
        record.prompt_tokens = prompt
        replica.engine.add(SimRequest(record, prompt, output))
        self._in_flight += 1
        if not replica.busy:
            self._start_step(replica)

    def _start_step(self, replica: Replica) -> None:
        outcome = replica.engine.step()
        replica.busy = True
        self._push(self.now + outcome.duration_s, _STEP_DONE, (replica, outcome))

    def _step_done(self, payload: tuple[Replica, StepOutcome]) -> float:
        replica, outcome = payload
        for request in outcome.first_tokens:
            request.record.token_times.append(self.now)
        for request in outcome.finished:
            record = request.record
            record.end = self.now
            record.output_tokens = request.output
            replica.endpoint.on_finish(self.now, request.prompt, request.output, record.ttft, record.e2e)
            self._in_flight -= 1
        replica.busy = False
        if replica.engine.has_work():
            self._start_step(replica)
        else:
            self._stop_if_drained(replica)
        return self.now

    # -- the autoscaler ---------------------------------------------------------------

    def _sample(self) -> None:
        ready = [self._by_endpoint[e.name] for e in self._routable]
        total = sum(r.engine.concurrency for r in ready)
        timeline = self._timeline
        timeline.times.append(self.now)
        timeline.concurrency.append(total)
        timeline.ready.append(len(ready))
        timeline.current.append(len(self._live()))
        timeline.desired.append(self._desired)
        if self._policy is not None:
            self._policy.observe(self.now, Observation(CONCURRENCY_METRIC, float(total), len(ready)))
        self._push(self.now + SAMPLE_INTERVAL_S, _SAMPLE)

    def _sync(self) -> None:
        assert self._policy is not None
        decision = self._policy.recommend(self.now, len(self._live()), len(self._routable))
        if decision.desired != self._desired:
            self._scale_events.append(ScaleEvent(self.now, self._desired, decision.desired))
            self._desired = decision.desired
        self._scale_to(decision.desired)
        self._push(self.now + self._policy.sync_period, _SYNC)


# ---------------------------------------------------------------------------------------
# What a run says about the policy
# ---------------------------------------------------------------------------------------


def count_oscillations(events: list[ScaleEvent], window_s: float) -> int:
    """Direction reversals: a change against the previous change's direction within ``window_s``."""
    reversals = 0
    for before, after in pairwise(events):
        up_then_down = before.desired > before.previous and after.desired < after.previous
        down_then_up = before.desired < before.previous and after.desired > after.previous
        if (up_then_down or down_then_up) and after.at - before.at <= window_s:
            reversals += 1
    return reversals


def replicas_needed(
    reference: Timeline, start_s: float, end_s: float, target: float, min_replicas: int, max_replicas: int
) -> int:
    """Replicas that carry the reference run's mean concurrency over ``[start_s, end_s)`` at
    ``target`` per replica, within the bounds. The reference is the fleet fixed at its
    maximum: the concurrency the requests themselves bring when capacity is ample."""
    window = [c for t, c in zip(reference.times, reference.concurrency) if start_s <= t < end_s]
    mean = sum(window) / len(window) if window else 0.0
    return max(min_replicas, min(max_replicas, math.ceil(mean / target)))


def reaction_time(timeline: Timeline, burst_start_s: float, needed: int) -> float | None:
    """Seconds from the burst's start until the ready replicas reach ``needed`` (to the
    second the timeline samples), or None if they never do."""
    for at, ready in zip(timeline.times, timeline.ready):
        if at >= burst_start_s and ready >= needed:
            return at - burst_start_s
    return None


def slo_attainment(records: list[RequestRecord], slo: Slo) -> float:
    """The fraction of requests meeting every objective of ``slo``."""
    good = compute_metrics(records, slo).good
    return (good or 0) / len(records) if records else 0.0


# A replica's SLO capacity: the highest rate at which this share of requests meets the SLO.
CAPACITY_ATTAINMENT = 0.95
# Knative's container-concurrency-target-percentage default: aim each replica at 70% of what
# it can carry, leaving the rest as headroom for the time a scale-up takes.
TARGET_UTILISATION = 0.70


@dataclass(frozen=True, slots=True)
class Calibration:
    """One replica on one request mix: its SLO capacity and the concurrency it holds at
    ``TARGET_UTILISATION`` of it, the per-replica concurrency target the policies aim at."""

    capacity_rps: float
    target: float


def calibrate(
    lengths: LengthPool, engine_config: EngineCoreConfig, slo: Slo, duration_s: float, seed: int = 0
) -> Calibration:
    """Why not one target for every workload: concurrency is rate x latency, so a replica at
    capacity holds a few short code completions but a hundred chat replies. An operator sets
    the target per deployment; this sets it the same way for each mix, by simulation.

    The capacity is bracketed by doubling from 1 req/s, then bisected to 5% (Poisson
    arrivals, ``duration_s`` each, one replica).
    """

    def run(rate: float) -> RunResult:
        workload = constant_workload(rate, duration_s, lengths, "calibration", seed)
        return AutoscaleSimulation(workload, engine_config, None, FleetBounds(1, 1, 1, 0.0), seed).run()

    def meets(rate: float) -> bool:
        return slo_attainment(run(rate).records, slo) >= CAPACITY_ATTAINMENT

    low, high = 0.0, 1.0
    while meets(high):
        low, high = high, high * 2
    if low == 0.0:
        raise ValueError(f"one replica cannot meet the SLO for {CAPACITY_ATTAINMENT:.0%} of requests even at 1 req/s")
    while high - low > 0.05 * low:
        middle = (low + high) / 2
        low, high = (middle, high) if meets(middle) else (low, middle)
    timeline = run(TARGET_UTILISATION * low).timeline
    window = [c for t, c in zip(timeline.times, timeline.concurrency) if t < duration_s]
    return Calibration(low, sum(window) / len(window))
