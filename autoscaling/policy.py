"""What every scaling policy takes and gives, and the rules they share.

A policy is fed observations as the metrics arrive (``observe``) and asked for a replica
count on its own cadence (``recommend``, every ``sync_period`` seconds: HPA's sync period,
Knative's tick, AIBrix's resync). Time is always an argument, never read from a clock, so the
autoscaler actor and the discrete-event simulation drive the same objects.

Shared rules, from Kubernetes' HPA because it states them precisely:

- several metric sources: each proposes a replica count and the largest wins;
- a source without data: if every source lacks data, or if some do and the others would scale
  down, hold the current count (``computeReplicasForMetrics``);
- the result always lies within ``[minReplicas, maxReplicas]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from autoscaling.spec import ApaSettings, KpaSettings, MetricSource, PodAutoscalerSpec, settings_from_annotations


@dataclass(frozen=True)
class Observation:
    """One reading of one metric source.

    For a ``pod`` source, ``total`` is the sum of the per-pod values over the ready pods that
    reported and ``pods`` is how many reported (0: the scrape found nothing). For a ``gateway``
    or ``external`` source, ``total`` is the one value for the whole target and ``pods`` is 1
    when it was read, 0 when it could not be.
    """

    metric: str
    total: float
    pods: int


@dataclass(frozen=True)
class Decision:
    """A replica count and why: ``reason`` in words, ``details`` every number that led there."""

    desired: int
    reason: str
    details: dict[str, float]


class ScalingPolicy(Protocol):
    @property
    def sync_period(self) -> float:
        """Seconds between ``recommend`` calls the policy's source assumes."""
        ...

    def observe(self, now: float, observation: Observation) -> None: ...

    def recommend(self, now: float, current: int, ready: int) -> Decision:
        """``current``: replicas the target has, starting ones included; ``ready``: ready ones."""
        ...


@dataclass(frozen=True)
class Proposal:
    """One metric source's replica count and the arithmetic behind it."""

    metric: str
    replicas: int
    explanation: str
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Combined:
    """The proposals merged by the HPA rules: ``replicas`` is None when the rules say hold."""

    replicas: int | None
    explanation: str


def no_data_reason(current: int, missing: list[str]) -> str:
    return f"hold at {current}: no data for {', '.join(missing)}"


def partial_data_hold(proposed: int, current: int, missing: list[str]) -> str | None:
    """Why to hold at ``current`` instead of ``proposed``, or None to go ahead.

    Scaling down on partial data could remove capacity the silent metric would have asked
    for, so with a source missing only a scale-up may proceed.
    """
    if missing and proposed < current:
        return f"hold at {current}: {proposed} would scale down but {', '.join(missing)} has no data"
    return None


def gather_proposals(
    sources: list[MetricSource], propose: Callable[[MetricSource], Proposal | None]
) -> tuple[list[Proposal], list[str]]:
    """Each source's proposal, and the names of the sources without data."""
    proposals, missing = [], []
    for source in sources:
        proposal = propose(source)
        if proposal is None:
            missing.append(source.targetMetric)
        else:
            proposals.append(proposal)
    return proposals, missing


def combine_proposals(proposals: list[Proposal], missing: list[str], current: int) -> Combined:
    """The largest proposal, unless missing data says hold."""
    if not proposals:
        return Combined(None, no_data_reason(current, missing))
    best = max(proposals, key=lambda p: p.replicas)
    hold = partial_data_hold(best.replicas, current, missing)
    if hold is not None:
        return Combined(None, hold)
    tail = f" (largest of {len(proposals)} proposals)" if len(proposals) > 1 else ""
    gap = f"; no data for {', '.join(missing)}" if missing else ""
    return Combined(best.replicas, f"{best.explanation}{tail}{gap}")


def clamp_to_bounds(replicas: int, min_replicas: int, max_replicas: int) -> int:
    return max(min_replicas, min(max_replicas, replicas))


def bounds_note(desired: int, bounded: int, min_replicas: int, max_replicas: int) -> str:
    """Say so when the spec's bounds changed the count, and nothing otherwise."""
    if bounded > desired:
        return f"; raised to minReplicas {min_replicas}"
    if bounded < desired:
        return f"; capped at maxReplicas {max_replicas}"
    return ""


def hold_decision(spec: PodAutoscalerSpec, current: int, reason: str, details: dict[str, float]) -> Decision:
    """Keep the current count (moved into the bounds if it is outside them)."""
    held = clamp_to_bounds(current, spec.minReplicas, spec.maxReplicas)
    details["desired"] = float(held)
    return Decision(held, reason + bounds_note(current, held, spec.minReplicas, spec.maxReplicas), details)


def proposal_details(proposals: list[Proposal]) -> dict[str, float]:
    """Every source's numbers, keyed ``<metric>.<name>``."""
    details: dict[str, float] = {}
    for proposal in proposals:
        details.update({f"{proposal.metric}.{k}": v for k, v in proposal.details.items()})
        details[f"{proposal.metric}.proposal"] = float(proposal.replicas)
    return details


def build_policy(spec: PodAutoscalerSpec, annotations: dict[str, str]) -> ScalingPolicy:
    """The policy the spec's strategy names, tuned by the annotations."""
    # Imported here: the policy modules import this one for the shared types.
    from autoscaling.apa import ApaPolicy
    from autoscaling.hpa import HpaPolicy
    from autoscaling.kpa import KpaPolicy

    settings = settings_from_annotations(spec.scalingStrategy, annotations)
    if isinstance(settings, KpaSettings):
        return KpaPolicy(spec, settings)
    if isinstance(settings, ApaSettings):
        return ApaPolicy(spec, settings)
    return HpaPolicy(spec, settings)
