"""AIBrix's Application-specific Pod Autoscaler (APA): act only outside a tolerance band.

Source: ``vllm-project/aibrix`` ``pkg/controller/podautoscaler/algorithm/apa.go``
(``computeTargetReplicas``, after Huo et al., "High Concurrency Response Strategy based on
Kubernetes Horizontal Pod Autoscaler", 2023), with the historic
``apa.autoscaling.aibrix.ai`` window and tolerances. With ``N`` pods, a per-pod value ``u``
averaged over the window and the target ``T``:

- ``u / T > 1 + up-fluctuation-tolerance``: ``min(ceil(N x u / T), ceil(max-scale-up-rate x N))``;
- ``u / T < 1 - down-fluctuation-tolerance``: ``max(ceil(N x u / T), floor(N / max-scale-down-rate))``;
- otherwise no change.

The band is asymmetric by default (0.1 up, 0.2 down): a steady application is scaled up
promptly and down reluctantly, and small fluctuations never move it.

What ``N`` and ``u`` are here: ``u`` is the average over the ready pods that reported (for a
gateway or external value, that value divided by the ready pods), so ``N`` is the ready count
(at least 1) and ``N x u / T`` is the load in pods. AIBrix multiplies by the target's replica
count instead, which over-counts while replicas are starting; with ``N`` ready, a proposal
could in turn undercut replicas that are still starting, so, as Kubernetes' HPA does when its
correction for unmeasured pods would reverse the direction, a scale-up never proposes fewer
than ``current`` replicas, a scale-down never more, and inside the band the count stays at
``current``.
"""

from __future__ import annotations

import math

from autoscaling.policy import (
    Decision,
    Observation,
    Proposal,
    bounds_note,
    clamp_to_bounds,
    combine_proposals,
    gather_proposals,
    hold_decision,
    proposal_details,
)
from autoscaling.spec import ApaSettings, MetricSource, PodAutoscalerSpec
from autoscaling.windows import BUCKET_SIZE, TimedBuckets


def usage_ratio(current_use_per_pod: float, expected_use: float) -> float:
    return current_use_per_pod / expected_use


def apa_max_scale_up(max_scale_up_rate: float, pod_count: float) -> int:
    return math.ceil(max_scale_up_rate * pod_count)


def apa_max_scale_down(max_scale_down_rate: float, pod_count: float) -> int:
    return math.floor(pod_count / max_scale_down_rate)


def expected_pods(pod_count: float, ratio: float) -> int:
    """The pods that carry the current load at the target: ``ceil(N x u / T)``."""
    return math.ceil(pod_count * ratio)


def tolerance_band_replicas(
    metric: str,
    current: int,
    pod_count: float,
    current_use_per_pod: float,
    expected_use: float,
    settings: ApaSettings,
) -> Proposal:
    """``computeTargetReplicas`` for one source, guarded against undercutting ``current``."""
    ratio = usage_ratio(current_use_per_pod, expected_use)
    upper, lower = 1 + settings.up_fluctuation_tolerance, 1 - settings.down_fluctuation_tolerance
    details = {"per_pod": current_use_per_pod, "target": expected_use, "usage_ratio": ratio, "pod_count": pod_count}
    head = f"{metric} {current_use_per_pod:g} per pod / target {expected_use:g} = ratio {ratio:.4g}"
    if ratio > upper:
        bound = apa_max_scale_up(settings.max_scale_up_rate, pod_count)
        wanted = expected_pods(pod_count, ratio)
        replicas = max(current, min(wanted, bound))
        text = f"{head} > {upper:g}: ceil({pod_count:g} x {ratio:.4g}) = {wanted}"
        if wanted > bound:
            text += f", limited by max-scale-up-rate {settings.max_scale_up_rate:g} to {bound}"
        if replicas > min(wanted, bound):
            text += f"; a scale-up keeps the {current} replicas there are"
    elif ratio < lower:
        bound = apa_max_scale_down(settings.max_scale_down_rate, pod_count)
        wanted = expected_pods(pod_count, ratio)
        replicas = min(current, max(wanted, bound))
        text = f"{head} < {lower:g}: ceil({pod_count:g} x {ratio:.4g}) = {wanted}"
        if wanted < bound:
            text += f", limited by max-scale-down-rate {settings.max_scale_down_rate:g} to {bound}"
        if replicas < max(wanted, bound):
            text += f"; a scale-down never adds to the {current} replicas there are"
    else:
        replicas = current
        text = f"{head}, inside the band [{lower:g}, {upper:g}]: keep {current}"
    return Proposal(metric, replicas, text, details)


class ApaPolicy:
    """AIBrix's APA over our metric sources, each averaged over the APA window."""

    def __init__(self, spec: PodAutoscalerSpec, settings: ApaSettings | None = None) -> None:
        self.spec = spec
        self.settings = settings or ApaSettings()
        self._windows = {m.targetMetric: TimedBuckets(self.settings.window, BUCKET_SIZE) for m in spec.metricsSources}

    @property
    def sync_period(self) -> float:
        return self.settings.sync_period

    def observe(self, now: float, observation: Observation) -> None:
        """A pod source's window holds the per-pod average; a gateway or external one the value."""
        source = self.spec.source(observation.metric)
        if observation.pods == 0:
            return
        value = observation.total / observation.pods if source.metricSourceType == "pod" else observation.total
        self._windows[observation.metric].record(now, value)

    def _proposal(self, source: MetricSource, now: float, current: int, ready: int) -> Proposal | None:
        window = self._windows[source.targetMetric]
        if window.is_empty(now):
            return None
        value = window.window_average(now)
        pod_count = float(max(1, ready))
        per_pod = value if source.metricSourceType == "pod" else value / pod_count
        return tolerance_band_replicas(
            source.targetMetric, current, pod_count, per_pod, source.targetValue, self.settings
        )

    def recommend(self, now: float, current: int, ready: int) -> Decision:
        spec = self.spec
        details: dict[str, float] = {"current": float(current), "ready": float(ready)}
        proposals, missing = gather_proposals(spec.metricsSources, lambda source: self._proposal(source, now, current, ready))
        details.update(proposal_details(proposals))
        combined = combine_proposals(proposals, missing, current)
        if combined.replicas is None:
            return hold_decision(spec, current, combined.explanation, details)
        bounded = clamp_to_bounds(combined.replicas, spec.minReplicas, spec.maxReplicas)
        details["desired"] = float(bounded)
        reason = combined.explanation + bounds_note(combined.replicas, bounded, spec.minReplicas, spec.maxReplicas)
        return Decision(bounded, reason, details)
