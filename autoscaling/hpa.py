"""Kubernetes' Horizontal Pod Autoscaler, computed as the controller computes it.

Sources (``kubernetes/kubernetes``, ``pkg/controller/podautoscaler``):

- ``replica_calculator.go``: ``calcPlainMetricReplicas`` for per-pod metrics (the usage ratio
  is the per-pod average over the pods that reported, divided by the target; inside the
  tolerance band ``[1 - scaleDown, 1 + scaleUp]`` nothing changes; otherwise
  ``ceil(ratio x pods)``) with its missing-metric rules (pods without a metric count at the
  target on a scale-down and at 0 on a scale-up, not-yet-ready pods at 0 on a scale-up, and a
  correction that flips the direction holds instead), and ``GetExternalPerPodMetricReplicas``
  for one value against a per-replica target (``ceil(value / target)``).
- ``horizontal.go``: the largest proposal over metrics and the partial-data hold
  (``computeReplicasForMetrics``), out-of-bounds replica counts moved to the bounds first, the
  stabilization windows (``stabilizeRecommendationWithBehaviors``: the current count is pulled
  no lower than the lowest recommendation of the scale-up window and no higher than the
  highest of the scale-down window, the controller's first recommendation being the current
  count), and the behavior rate limits (``calculateScaleUpLimitWithScalingRules`` /
  ``calculateScaleDownLimitWithBehaviors``: every policy limits the change relative to the
  count the period started with, and ``selectPolicy`` picks the largest or smallest change).

Mapping to our observations: a ``pod`` source's reporting pods are the controller's pods with
metrics, ready pods that did not report are its missing pods, and replicas still starting
(``current - ready``) are its unready pods. A ``gateway`` or ``external`` source is an External
metric with an ``AverageValue`` target, compared against the ``current`` replicas.

We always apply ``behavior`` (with the API server's defaults). A Kubernetes HPA without a
``behavior`` field takes an older path instead (scale-up capped at ``max(2 x current, 4)``);
the default policies allow the same within one 15 s period. ``recommend`` assumes its decision
is applied, as the controller records a scale event after it updates the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from autoscaling.policy import (
    Decision,
    Observation,
    Proposal,
    combine_proposals,
    gather_proposals,
    hold_decision,
    proposal_details,
)
from autoscaling.spec import HpaScalingPolicy, HpaSettings, MetricSource, PodAutoscalerSpec, SelectPolicy


@dataclass(frozen=True)
class Tolerances:
    """The dead band around a usage ratio of 1 inside which the HPA does not act."""

    scale_down: float
    scale_up: float

    def is_within(self, usage_ratio: float) -> bool:
        return 1.0 - self.scale_down <= usage_ratio <= 1.0 + self.scale_up

    def describe(self) -> str:
        return f"[{1.0 - self.scale_down:g}, {1.0 + self.scale_up:g}]"


def plain_metric_replicas(
    metric: str,
    current_replicas: int,
    usage_total: float,
    ready_pod_count: int,
    missing_pods: int,
    unready_pods: int,
    target_usage: float,
    tolerances: Tolerances,
) -> Proposal:
    """``calcPlainMetricReplicas``: replicas for a per-pod metric with an AverageValue target.

    ``usage_total`` sums the metric over the ``ready_pod_count`` pods that reported it.
    """
    usage = usage_total / ready_pod_count
    usage_ratio = usage / target_usage
    details = {
        "total": float(usage_total),
        "pods": float(ready_pod_count),
        "per_pod": usage,
        "target": target_usage,
        "usage_ratio": usage_ratio,
    }
    head = f"{metric} {usage:g} per pod / target {target_usage:g} = ratio {usage_ratio:.4g}"
    scale_up_with_unready = unready_pods > 0 and usage_ratio > 1.0

    if not scale_up_with_unready and missing_pods == 0:
        if tolerances.is_within(usage_ratio):
            return Proposal(
                metric,
                current_replicas,
                f"{head}, within tolerance {tolerances.describe()}: keep {current_replicas}",
                details,
            )
        replicas = math.ceil(usage_ratio * ready_pod_count)
        return Proposal(
            metric, replicas, f"{head}; ceil({usage_ratio:.4g} x {ready_pod_count} pods) = {replicas}", details
        )

    # Re-run the ratio with conservative values for pods that could not be measured.
    counted_total, counted_pods, notes = usage_total, ready_pod_count, []
    if missing_pods > 0 and usage_ratio < 1.0:
        counted_total += missing_pods * target_usage
        counted_pods += missing_pods
        notes.append(f"{missing_pods} pods without data counted at the target")
    elif missing_pods > 0 and usage_ratio > 1.0:
        counted_pods += missing_pods
        notes.append(f"{missing_pods} pods without data counted at 0")
    if scale_up_with_unready:
        counted_pods += unready_pods
        notes.append(f"{unready_pods} starting pods counted at 0")
    new_usage_ratio = counted_total / counted_pods / target_usage
    details.update(new_usage_ratio=new_usage_ratio, counted_pods=float(counted_pods))
    head = f"{head}; {', '.join(notes)}: ratio {new_usage_ratio:.4g} over {counted_pods} pods"

    if tolerances.is_within(new_usage_ratio):
        return Proposal(
            metric,
            current_replicas,
            f"{head}, within tolerance {tolerances.describe()}: keep {current_replicas}",
            details,
        )
    if (usage_ratio < 1.0 < new_usage_ratio) or (usage_ratio > 1.0 > new_usage_ratio):
        return Proposal(
            metric, current_replicas, f"{head}, which reverses the direction: keep {current_replicas}", details
        )
    replicas = math.ceil(new_usage_ratio * counted_pods)
    if (new_usage_ratio < 1.0 and replicas > current_replicas) or (
        new_usage_ratio > 1.0 and replicas < current_replicas
    ):
        return Proposal(
            metric,
            current_replicas,
            f"{head}; ceil(...) = {replicas} reverses the direction: keep {current_replicas}",
            details,
        )
    return Proposal(
        metric, replicas, f"{head}; ceil({new_usage_ratio:.4g} x {counted_pods} pods) = {replicas}", details
    )


def external_per_pod_metric_replicas(
    metric: str, current_replicas: int, usage: float, target_average_usage: float, tolerances: Tolerances
) -> Proposal:
    """``GetExternalPerPodMetricReplicas``: one value for the whole target, a per-replica target."""
    details = {"total": float(usage), "target": target_average_usage}
    if current_replicas > 0:
        usage_ratio = usage / (target_average_usage * current_replicas)
        details["usage_ratio"] = usage_ratio
        head = f"{metric} {usage:g} / ({current_replicas} replicas x target {target_average_usage:g}) = ratio {usage_ratio:.4g}"
        if tolerances.is_within(usage_ratio):
            return Proposal(
                metric,
                current_replicas,
                f"{head}, within tolerance {tolerances.describe()}: keep {current_replicas}",
                details,
            )
    else:
        head = f"{metric} {usage:g} with no replicas"
    replicas = math.ceil(usage / target_average_usage)
    return Proposal(metric, replicas, f"{head}; ceil({usage:g} / {target_average_usage:g}) = {replicas}", details)


@dataclass(frozen=True)
class Recommendation:
    """An unstabilized recommendation, kept for the stabilization windows."""

    timestamp: float
    replicas: int


@dataclass(frozen=True)
class ScaleEvent:
    """A change the controller made: ``change`` pods added (scale-up list) or removed (scale-down list)."""

    timestamp: float
    change: int


def stabilize_recommendation(
    now: float,
    current_replicas: int,
    desired_replicas: int,
    recommendations: list[Recommendation],
    scale_up_window: float,
    scale_down_window: float,
) -> int:
    """``stabilizeRecommendationWithBehaviors``: keep ``current`` unless every recommendation of
    the scale-up window is above it (then the lowest of them) or every one of the scale-down
    window is below it (then the highest)."""
    up_recommendation = down_recommendation = desired_replicas
    for rec in recommendations:
        if rec.timestamp > now - scale_up_window:
            up_recommendation = min(up_recommendation, rec.replicas)
        if rec.timestamp > now - scale_down_window:
            down_recommendation = max(down_recommendation, rec.replicas)
    return min(max(current_replicas, up_recommendation), down_recommendation)


def replicas_change_per_period(now: float, period: float, events: list[ScaleEvent]) -> int:
    """``getReplicasChangePerPeriod``: pods changed by the events of the last ``period``."""
    return sum(event.change for event in events if event.timestamp > now - period)


def _period_start_replicas(
    now: float,
    period: float,
    current_replicas: int,
    scale_up_events: list[ScaleEvent],
    scale_down_events: list[ScaleEvent],
) -> int:
    added = replicas_change_per_period(now, period, scale_up_events)
    deleted = replicas_change_per_period(now, period, scale_down_events)
    return current_replicas - added + deleted


def scale_up_limit(
    now: float,
    current_replicas: int,
    scale_up_events: list[ScaleEvent],
    scale_down_events: list[ScaleEvent],
    policies: list[HpaScalingPolicy],
    select_policy: SelectPolicy,
) -> int:
    """``calculateScaleUpLimitWithScalingRules``: the most replicas the scale-up policies allow."""
    if select_policy == "Disabled":
        return current_replicas
    proposals = []
    for policy in policies:
        start = _period_start_replicas(now, policy.period, current_replicas, scale_up_events, scale_down_events)
        if policy.type == "Pods":
            proposals.append(start + policy.value)
        else:  # rounded up, or a small percentage of few replicas would never add one
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return max(proposals) if select_policy == "Max" else min(proposals)


def scale_down_limit(
    now: float,
    current_replicas: int,
    scale_up_events: list[ScaleEvent],
    scale_down_events: list[ScaleEvent],
    policies: list[HpaScalingPolicy],
    select_policy: SelectPolicy,
) -> int:
    """``calculateScaleDownLimitWithBehaviors``: the fewest replicas the scale-down policies allow.

    "Max" selects the largest change, which is the smallest replica count.
    """
    if select_policy == "Disabled":
        return current_replicas
    proposals = []
    for policy in policies:
        start = _period_start_replicas(now, policy.period, current_replicas, scale_up_events, scale_down_events)
        if policy.type == "Pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    return min(proposals) if select_policy == "Max" else max(proposals)


LimitReason = Literal["ScaleUpLimit", "TooManyReplicas", "ScaleDownLimit", "TooFewReplicas", "DesiredWithinRange"]


def convert_desired_replicas_with_behavior_rate(
    current_replicas: int,
    desired_replicas: int,
    min_replicas: int,
    max_replicas: int,
    up_limit: int,
    down_limit: int,
) -> tuple[int, LimitReason]:
    """``convertDesiredReplicasWithBehaviorRate``: apply the rate limits and the bounds in the
    direction of the change. A limit behind ``current`` (the period already used it up) holds."""
    if desired_replicas > current_replicas:
        up_limit = max(up_limit, current_replicas)
        if max_replicas > up_limit:
            maximum, reason = up_limit, "ScaleUpLimit"
        else:
            maximum, reason = max_replicas, "TooManyReplicas"
        if desired_replicas > maximum:
            return maximum, reason
    elif desired_replicas < current_replicas:
        down_limit = min(down_limit, current_replicas)
        if min_replicas < down_limit:
            minimum, reason = down_limit, "ScaleDownLimit"
        else:
            minimum, reason = min_replicas, "TooFewReplicas"
        if desired_replicas < minimum:
            return minimum, reason
    return desired_replicas, "DesiredWithinRange"


def _describe_policies(policies: list[HpaScalingPolicy], select_policy: SelectPolicy) -> str:
    listed = ", ".join(f"{p.type} {p.value} per {p.period:g}s" for p in policies)
    return f"{select_policy} of {listed}" if select_policy != "Disabled" else "Disabled"


class HpaPolicy:
    """Kubernetes' HPA over our metric sources; state is the HPA controller's per-HPA state."""

    def __init__(self, spec: PodAutoscalerSpec, settings: HpaSettings | None = None) -> None:
        self.spec = spec
        self.settings = settings or HpaSettings()
        self.tolerances = Tolerances(self.settings.scale_down_tolerance, self.settings.scale_up_tolerance)
        self._latest: dict[str, Observation] = {}
        self._recommendations: list[Recommendation] = []
        self._scale_up_events: list[ScaleEvent] = []
        self._scale_down_events: list[ScaleEvent] = []
        self._started = False

    @property
    def sync_period(self) -> float:
        return self.settings.sync_period

    def observe(self, now: float, observation: Observation) -> None:
        """The HPA reads the latest value at each sync; keep only that."""
        self.spec.source(observation.metric)
        self._latest[observation.metric] = observation

    def _proposal(self, source: MetricSource, current: int, ready: int) -> Proposal | None:
        observation = self._latest.get(source.targetMetric)
        if observation is None or observation.pods == 0:
            return None
        if source.metricSourceType == "pod":
            return plain_metric_replicas(
                source.targetMetric,
                current,
                observation.total,
                observation.pods,
                missing_pods=max(0, ready - observation.pods),
                unready_pods=max(0, current - ready),
                target_usage=source.targetValue,
                tolerances=self.tolerances,
            )
        return external_per_pod_metric_replicas(
            source.targetMetric, current, observation.total, source.targetValue, self.tolerances
        )

    def recommend(self, now: float, current: int, ready: int) -> Decision:
        spec = self.spec
        if not self._started:  # recordInitialRecommendation: the controller starts from "as is"
            self._started = True
            self._recommendations.append(Recommendation(now, current))
        details: dict[str, float] = {
            "current": float(current),
            "ready": float(ready),
            "min_replicas": float(spec.minReplicas),
            "max_replicas": float(spec.maxReplicas),
        }

        if current == 0 and spec.minReplicas != 0:
            return Decision(0, "scaling disabled: the target has 0 replicas, which the HPA leaves alone", details)
        if current > spec.maxReplicas:
            desired, reason = spec.maxReplicas, f"{current} replicas is above maxReplicas {spec.maxReplicas}"
        elif current < spec.minReplicas:
            desired, reason = spec.minReplicas, f"{current} replicas is below minReplicas {spec.minReplicas}"
        else:
            proposals, missing = gather_proposals(spec.metricsSources, lambda source: self._proposal(source, current, ready))
            details.update(proposal_details(proposals))
            combined = combine_proposals(proposals, missing, current)
            if combined.replicas is None:
                return hold_decision(spec, current, combined.explanation, details)
            desired, reason = self._normalize(now, current, combined.replicas, details)
            reason = f"{combined.explanation}{reason}"

        self._record_scale_event(now, current, desired)
        details["desired"] = float(desired)
        return Decision(desired, reason, details)

    def _normalize(self, now: float, current: int, recommendation: int, details: dict[str, float]) -> tuple[int, str]:
        """``normalizeDesiredReplicasWithBehaviors``: stabilize, then rate-limit and bound."""
        spec, settings = self.spec, self.settings
        stabilized = stabilize_recommendation(
            now,
            current,
            recommendation,
            self._recommendations,
            settings.scale_up_stabilization_window,
            settings.scale_down_stabilization_window,
        )
        self._recommendations.append(Recommendation(now, recommendation))
        horizon = max(settings.scale_up_stabilization_window, settings.scale_down_stabilization_window)
        self._recommendations = [r for r in self._recommendations if r.timestamp >= now - horizon]

        up_limit = scale_up_limit(
            now,
            current,
            self._scale_up_events,
            self._scale_down_events,
            settings.scale_up_policies,
            settings.scale_up_select_policy,
        )
        down_limit = scale_down_limit(
            now,
            current,
            self._scale_up_events,
            self._scale_down_events,
            settings.scale_down_policies,
            settings.scale_down_select_policy,
        )
        desired, limit = convert_desired_replicas_with_behavior_rate(
            current, stabilized, spec.minReplicas, spec.maxReplicas, up_limit, down_limit
        )
        details.update(
            recommendation=float(recommendation),
            stabilized=float(stabilized),
            scale_up_limit=float(up_limit),
            scale_down_limit=float(down_limit),
        )

        notes = ""
        if stabilized > recommendation:
            notes += (
                f"; the {settings.scale_down_stabilization_window:g}s scale-down stabilization window "
                f"holds it at {stabilized} (recent recommendations were higher)"
            )
        elif stabilized < recommendation:
            notes += (
                f"; the {settings.scale_up_stabilization_window:g}s scale-up stabilization window "
                f"holds it at {stabilized} (recent recommendations were lower)"
            )
        if limit == "ScaleUpLimit":
            policies = _describe_policies(settings.scale_up_policies, settings.scale_up_select_policy)
            notes += f"; limited to {desired} by the scale-up policies ({policies})"
        elif limit == "ScaleDownLimit":
            policies = _describe_policies(settings.scale_down_policies, settings.scale_down_select_policy)
            notes += f"; limited to {desired} by the scale-down policies ({policies})"
        elif limit == "TooManyReplicas":
            notes += f"; capped at maxReplicas {spec.maxReplicas}"
        elif limit == "TooFewReplicas":
            notes += f"; raised to minReplicas {spec.minReplicas}"
        return desired, notes

    def _record_scale_event(self, now: float, current: int, desired: int) -> None:
        """``storeScaleEvent``, dropping events no policy period can still see."""
        if desired > current:
            self._scale_up_events.append(ScaleEvent(now, desired - current))
        elif desired < current:
            self._scale_down_events.append(ScaleEvent(now, current - desired))
        longest = max(
            (p.period for p in [*self.settings.scale_up_policies, *self.settings.scale_down_policies]), default=0.0
        )
        self._scale_up_events = [e for e in self._scale_up_events if e.timestamp > now - longest]
        self._scale_down_events = [e for e in self._scale_down_events if e.timestamp > now - longest]
