"""Knative's Pod Autoscaler (KPA): a stable window for the steady state, a panic window for bursts.

Source: ``knative/serving`` ``pkg/autoscaler/scaling/autoscaler.go`` (``Scale``), with the
windows of ``pkg/autoscaler/aggregation`` and the defaults of ``config-autoscaler``. Per tick:

- the stable value S and the panic value P are the window averages of the observed total
  (Knative's revision-wide concurrency) over the stable and the panic window;
- ``dspc = ceil(S / target)`` and ``dppc = ceil(P / target)``, each then kept within
  ``[floor(ready / max-scale-down-rate), ceil(max-scale-up-rate x ready)]`` (ready counted as
  at least 1) and raised to ``activation-scale`` when it is above 0;
- panic starts (or is extended) when ``dppc / ready >= panic-threshold``, and ends only when a
  whole stable window has passed since it last held; in panic the count is the larger of the
  two and never goes down;
- with a ``scale-down-delay``, the count is the largest one decided within the delay;
- the excess burst capacity ``floor(ready x capacity - target-burst-capacity - P)`` says whether
  the ready pods could absorb a burst of that size (negative: Knative keeps the activator in
  the request path; here it is reported for the gateway and the status);
- a new autoscaler starts in panic at the ready count, so a restart that lost the metric
  history does not scale down before a stable window of data has been seen.

Where we differ from AIBrix's KPA (deliberately): AIBrix's current code feeds the formula the
per-pod *average* of the metric, so ``ceil(avg / target)`` under-scales by the number of pods;
we sum over the pods as Knative does. AIBrix enters panic on ``P / S > threshold`` (a ratio of
windows, which never fires under a load that is high but steady); we use Knative's
``dppc / ready``. AIBrix's current code drops the panic exit after a stable window, the held
panic count and the scale-down delay; we keep all three. AIBrix also puts a tolerance dead
band around the target, which Knative's decider does not have, and neither do we. AIBrix's KPA
defaults (panic window 10s, scale-up rate 2, burst capacity 2) are not Knative's; ours are.

Several metric sources (Knative has one): each source has its own windows, and the larger
``dspc`` and ``dppc`` over the sources drive the one panic state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaling.policy import (
    Decision,
    Observation,
    bounds_note,
    clamp_to_bounds,
    hold_decision,
    no_data_reason,
    partial_data_hold,
)
from autoscaling.spec import KpaSettings, MetricSource, PodAutoscalerSpec
from autoscaling.windows import BUCKET_SIZE, MaxWindow, TimedBuckets


def max_scale_up(max_scale_up_rate: float, ready_pods_count: float) -> int:
    """The most pods one decision may ask for; ceil() so a low rate can still add one pod."""
    return math.ceil(max_scale_up_rate * ready_pods_count)


def max_scale_down(max_scale_down_rate: float, ready_pods_count: float) -> int:
    """The fewest pods one decision may ask for."""
    return math.floor(ready_pods_count / max_scale_down_rate)


def desired_pod_count(observed_value: float, target_value: float) -> int:
    """``dspc`` / ``dppc``: pods needed to carry the observed total at the target per pod."""
    return math.ceil(observed_value / target_value)


def within_scale_rates(pod_count: int, max_scale_down_count: int, max_scale_up_count: int) -> int:
    return min(max(pod_count, max_scale_down_count), max_scale_up_count)


def with_activation_scale(desired: int, unbounded: int, activation_scale: int) -> int:
    """Once there is any load at all, ask for at least ``activation-scale`` pods."""
    if activation_scale > 1 and unbounded > 0 and activation_scale > desired:
        return activation_scale
    return desired


def is_over_panic_threshold(desired_panic_pod_count: int, ready_pods_count: float, panic_threshold: float) -> bool:
    """The panic window asks for ``panic_threshold`` times the ready pods or more."""
    return desired_panic_pod_count / ready_pods_count >= panic_threshold


def next_panic_time(panic_time: float | None, over_threshold: bool, now: float, stable_window: float) -> float | None:
    """When panic last held, or None once a whole stable window has passed without it."""
    if over_threshold:
        return now
    if panic_time is not None and panic_time + stable_window < now:
        return None
    return panic_time


def excess_burst_capacity(
    ready_pods: int, total_value: float, target_burst_capacity: float, observed_panic_value: float
) -> float:
    """Spare capacity beyond the wanted burst headroom: ``ready x capacity - TBC - P``.

    ``target_burst_capacity`` 0 disables the check (always 0), -1 means unlimited (always -1).
    """
    if target_burst_capacity == 0:
        return 0.0
    if target_burst_capacity < 0:
        return -1.0
    return float(math.floor(ready_pods * total_value - target_burst_capacity - observed_panic_value))


@dataclass(frozen=True)
class _Reading:
    """One source's window values and what they ask for."""

    source: MetricSource
    stable_value: float
    panic_value: float
    dspc: int
    dppc: int
    excess_burst_capacity: float

    def describe(self) -> str:
        return (
            f"{self.source.targetMetric}: stable {self.stable_value:g} / target {self.source.targetValue:g} "
            f"-> {self.dspc} pods, panic {self.panic_value:g} -> {self.dppc} pods"
        )

    def details(self) -> dict[str, float]:
        m = self.source.targetMetric
        return {
            f"{m}.stable_value": self.stable_value,
            f"{m}.panic_value": self.panic_value,
            f"{m}.target": self.source.targetValue,
            f"{m}.dspc": float(self.dspc),
            f"{m}.dppc": float(self.dppc),
            f"{m}.excess_burst_capacity": self.excess_burst_capacity,
        }


class KpaPolicy:
    """Knative's decider over our metric sources, with its panic and delay state."""

    def __init__(self, spec: PodAutoscalerSpec, settings: KpaSettings | None = None) -> None:
        self.spec = spec
        self.settings = settings or KpaSettings()
        s = self.settings
        self._stable = {m.targetMetric: TimedBuckets(s.stable_window, BUCKET_SIZE) for m in spec.metricsSources}
        self._panic = {m.targetMetric: TimedBuckets(s.panic_window, BUCKET_SIZE) for m in spec.metricsSources}
        # A one-bucket delay window is not "no delay": two decisions in one tick would take the
        # larger, so Knative only keeps one when a delay is set.
        self._delay_window = MaxWindow(s.scale_down_delay, s.sync_period) if s.scale_down_delay > 0 else None
        self._panic_time: float | None = None
        self._max_panic_pods = 0
        self._started = False
        self.excess_burst_capacity = 0.0

    @property
    def sync_period(self) -> float:
        return self.settings.sync_period

    @property
    def in_panic(self) -> bool:
        return self._panic_time is not None

    @property
    def panic_time(self) -> float | None:
        """When the panic condition last held (Knative's ``panicTime``), None out of panic."""
        return self._panic_time

    def observe(self, now: float, observation: Observation) -> None:
        """Record the total into both windows; a failed read leaves a gap, not a zero."""
        self.spec.source(observation.metric)
        if observation.pods == 0:
            return
        self._stable[observation.metric].record(now, observation.total)
        self._panic[observation.metric].record(now, observation.total)

    def _reading(self, source: MetricSource, now: float, ready: int) -> _Reading | None:
        stable = self._stable[source.targetMetric]
        if stable.is_empty(now):
            return None
        stable_value = stable.window_average(now)
        panic_value = self._panic[source.targetMetric].window_average(now)
        capacity = source.targetValue / (self.settings.target_utilization_percentage / 100.0)
        return _Reading(
            source,
            stable_value,
            panic_value,
            desired_pod_count(stable_value, source.targetValue),
            desired_pod_count(panic_value, source.targetValue),
            excess_burst_capacity(ready, capacity, self.settings.target_burst_capacity, panic_value),
        )

    def recommend(self, now: float, current: int, ready: int) -> Decision:
        spec, s = self.spec, self.settings
        steps: list[str] = []
        if not self._started:
            self._started = True
            if ready > 1:
                self._panic_time, self._max_panic_pods = now, ready
                steps.append(f"a new autoscaler starts in panic at the {ready} ready pods (it has no history yet)")
        details: dict[str, float] = {"current": float(current), "ready": float(ready)}
        readings, missing = [], []
        for source in spec.metricsSources:
            reading = self._reading(source, now, ready)
            if reading is None:
                missing.append(source.targetMetric)
            else:
                readings.append(reading)
                steps.append(reading.describe())
                details.update(reading.details())
        if not readings:  # Knative makes no decision without data
            return hold_decision(spec, current, no_data_reason(current, missing), details)

        dspc = max(r.dspc for r in readings)
        dppc = max(r.dppc for r in readings)
        ready_pods_count = float(max(1, ready))
        up_bound = max_scale_up(s.max_scale_up_rate, ready_pods_count)
        down_bound = max_scale_down(s.max_scale_down_rate, ready_pods_count)
        stable_in_rates = within_scale_rates(dspc, down_bound, up_bound)
        panic_in_rates = within_scale_rates(dppc, down_bound, up_bound)
        if (stable_in_rates, panic_in_rates) != (dspc, dppc):
            steps.append(
                f"max-scale-down-rate {s.max_scale_down_rate:g} and max-scale-up-rate {s.max_scale_up_rate:g} "
                f"allow {down_bound}..{up_bound} pods from {ready_pods_count:g} ready"
            )
        desired_stable = with_activation_scale(stable_in_rates, dspc, s.activation_scale)
        desired_panic = with_activation_scale(panic_in_rates, dppc, s.activation_scale)
        if (desired_stable, desired_panic) != (stable_in_rates, panic_in_rates):
            steps.append(f"activation-scale raises a non-zero count to {s.activation_scale}")

        desired = self._panic_or_stable(now, dppc, ready_pods_count, desired_stable, desired_panic, steps)
        desired = self._delayed(now, desired, steps, details)

        self.excess_burst_capacity = min(r.excess_burst_capacity for r in readings)
        details.update(
            ready_pods_count=ready_pods_count,
            max_scale_up=float(up_bound),
            max_scale_down=float(down_bound),
            desired_stable_pod_count=float(desired_stable),
            desired_panic_pod_count=float(desired_panic),
            in_panic=float(self.in_panic),
            max_panic_pods=float(self._max_panic_pods),
            excess_burst_capacity=self.excess_burst_capacity,
        )
        bounded = clamp_to_bounds(desired, spec.minReplicas, spec.maxReplicas)
        reason = "; ".join(steps) + bounds_note(desired, bounded, spec.minReplicas, spec.maxReplicas)
        hold = partial_data_hold(bounded, current, missing)
        if hold is not None:
            return hold_decision(spec, current, f"{reason}; {hold}", details)
        details["desired"] = float(bounded)
        return Decision(bounded, reason, details)

    def _panic_or_stable(
        self, now: float, dppc: int, ready_pods_count: float, desired_stable: int, desired_panic: int, steps: list[str]
    ) -> int:
        """Advance the panic state; in panic, the larger count and never a smaller one than before."""
        s = self.settings
        over = is_over_panic_threshold(dppc, ready_pods_count, s.panic_threshold)
        was_in_panic = self.in_panic
        self._panic_time = next_panic_time(self._panic_time, over, now, s.stable_window)
        ratio = f"{dppc} panic pods / {ready_pods_count:g} ready = {dppc / ready_pods_count:.3g}"
        if over:
            steps.append(
                f"{'stays in panic' if was_in_panic else 'panic'}: {ratio} >= panic-threshold {s.panic_threshold:g}"
            )
        elif was_in_panic and not self.in_panic:
            self._max_panic_pods = 0
            steps.append(f"panic over: {ratio} < {s.panic_threshold:g} for a whole {s.stable_window:g}s stable window")
        if not self.in_panic:
            steps.append(f"stable: {desired_stable} pods")
            return desired_stable
        # The stable window can be the higher one (a burst just ended): provision for both.
        wanted = max(desired_stable, desired_panic)
        self._max_panic_pods = max(self._max_panic_pods, wanted)
        steps.append(
            f"in panic (last over the threshold at t={self._panic_time:g}, ends {s.stable_window:g}s after): "
            f"max(stable {desired_stable}, panic {desired_panic}) = {wanted}, "
            f"never below {self._max_panic_pods} while panicking"
        )
        return self._max_panic_pods

    def _delayed(self, now: float, desired: int, steps: list[str], details: dict[str, float]) -> int:
        """With a scale-down delay, the most pods decided within it."""
        if self._delay_window is None:
            return desired
        self._delay_window.record(now, desired)
        delayed = int(self._delay_window.current())
        details["delayed_pod_count"] = float(delayed)
        if delayed != desired:
            steps.append(
                f"scale-down delay {self.settings.scale_down_delay:g}s holds {delayed}, the most decided within it"
            )
        return delayed
