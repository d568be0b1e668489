"""Rollout maths: the Kubernetes Deployment controller's algorithm over revisions of clusters.

Pure functions, no I/O. A revision's "size" is the number of its active clusters (not being
deleted, not broken); a step says which revisions to resize, and the controller turns that
into cluster creates and deletes (``fleet.clusters.victims`` picks which). Names follow
``pkg/controller/deployment`` (``rolling.go``, ``sync.go``, ``recreate.go``) so the two can
be read side by side; the rules are in ``../shared/reference/kubernetes.md`` §3.4.

Each reconcile takes at most one step, then the next reconcile re-reads the world: that is
what makes the loop level-triggered and safe to kill at any point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fleet.clusters import ClusterView

StrategyType = Literal["RollingUpdate", "Recreate"]


@dataclass(frozen=True)
class Revision:
    """One template's clusters and the sizing it was last given (ReplicaSet's annotations)."""

    hash: str
    number: int
    created: float
    clusters: tuple[ClusterView, ...] = ()
    desired: int | None = None  # spec.replicas when this revision was last scaled
    max_replicas: int | None = None  # spec.replicas + maxSurge then

    @property
    def size(self) -> int:
        return len(self.clusters)

    def available(self, min_ready_s: int, now: float) -> int:
        return sum(c.available(min_ready_s, now) for c in self.clusters)

    def ready(self) -> int:
        return sum(c.ready for c in self.clusters)


@dataclass(frozen=True)
class FleetState:
    """Everything one reconcile decides from: the spec, resolved, and the revisions."""

    replicas: int
    strategy: StrategyType
    max_surge: int
    max_unavailable: int
    min_ready_s: int
    new: Revision
    old: tuple[Revision, ...] = ()  # any order; functions sort as Deployment does
    now: float = 0.0
    old_terminating: int = 0  # old clusters already being deleted (Recreate waits for them)

    @property
    def all(self) -> tuple[Revision, ...]:
        return (*self.old, self.new)

    def total(self) -> int:
        return sum(r.size for r in self.all)

    def available(self) -> int:
        return sum(r.available(self.min_ready_s, self.now) for r in self.all)


@dataclass(frozen=True)
class Step:
    """Target sizes per revision hash; every revision named here is (re)annotated with the
    fleet's current desired and max replicas, as Deployment does when it scales a ReplicaSet."""

    sizes: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.sizes)


def scaled_value(value: int | str, total: int, round_up: bool) -> int:
    """An int-or-percent against ``total`` (``intstr.GetScaledValueFromIntOrPercent``)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if not text.endswith("%") or not text[:-1].isdigit():
        raise ValueError(f"{value!r} is neither an integer nor a percentage like '25%'")
    exact = int(text[:-1]) * total / 100
    return math.ceil(exact) if round_up else math.floor(exact)


def resolve_fenceposts(max_surge: int | str, max_unavailable: int | str, replicas: int) -> tuple[int, int]:
    """(surge, unavailable): surge rounds up, unavailable rounds down, and they are never
    both zero, or a rollout could never make a move."""
    surge = scaled_value(max_surge, replicas, round_up=True)
    unavailable = scaled_value(max_unavailable, replicas, round_up=False)
    if surge < 0 or unavailable < 0:
        raise ValueError("maxSurge and maxUnavailable must not be negative")
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, replicas)


def new_revision_size(state: FleetState) -> int:
    """``NewRSNewReplicas``: how big the new revision may grow in this step."""
    if state.strategy == "Recreate":
        return state.replicas
    max_total = state.replicas + state.max_surge
    current = state.total()
    if current >= max_total:
        return state.new.size
    return state.new.size + min(max_total - current, state.replicas - state.new.size)


def scale_up_new(state: FleetState) -> Step:
    """``reconcileNewReplicaSet``: grow the new revision within the surge (or shrink it to
    ``replicas`` if it is bigger)."""
    new = state.new
    if new.size == state.replicas:
        return Step()
    if new.size > state.replicas:
        return Step({new.hash: state.replicas}, "scaled down the new revision to the fleet's size")
    target = new_revision_size(state)
    return Step({new.hash: target}, "scaled up the new revision") if target != new.size else Step()


def _oldest_first(revisions: tuple[Revision, ...]) -> list[Revision]:
    return sorted(revisions, key=lambda r: (r.created, r.number))


def scale_down_old(state: FleetState) -> Step:
    """``reconcileOldReplicaSets``: shrink old revisions without going below
    ``replicas - maxUnavailable`` available clusters, their unavailable clusters first."""
    if sum(r.size for r in state.old) == 0:
        return Step()
    min_available = state.replicas - state.max_unavailable
    new_unavailable = state.new.size - state.new.available(state.min_ready_s, state.now)
    max_scaled_down = state.total() - min_available - new_unavailable
    if max_scaled_down <= 0:
        return Step()
    sizes: dict[str, int] = {}
    # Clean up unhealthy clusters first: removing them costs no availability.
    cleaned = 0
    for revision in _oldest_first(state.old):
        if cleaned >= max_scaled_down:
            break
        unavailable = revision.size - revision.available(state.min_ready_s, state.now)
        if revision.size == 0 or unavailable == 0:
            continue
        count = min(max_scaled_down - cleaned, unavailable)
        sizes[revision.hash] = revision.size - count
        cleaned += count
    # Then available ones, down to the floor.
    excess = state.available() - min_available
    removed = 0
    for revision in _oldest_first(state.old):
        if removed >= excess:
            break
        size = sizes.get(revision.hash, revision.size)
        if size == 0:
            continue
        count = min(size, excess - removed)
        sizes[revision.hash] = size - count
        removed += count
    return Step(sizes, "scaled down old revisions") if sizes else Step()


def rolling_step(state: FleetState) -> Step:
    """``rolloutRolling``: one move, new revision up first, else old ones down."""
    return scale_up_new(state) or scale_down_old(state)


def recreate_step(state: FleetState) -> Step:
    """``rolloutRecreate``: every old cluster goes, and only once they are all gone does the
    new revision start (two templates never run side by side, e.g. for GPU capacity)."""
    active_old = {r.hash: 0 for r in state.old if r.size > 0}
    if active_old:
        return Step(active_old, "scaled down every old revision (Recreate)")
    if state.old_terminating:
        return Step()
    if state.new.size != state.replicas:
        return Step({state.new.hash: state.replicas}, "scaled the new revision to the fleet's size (Recreate)")
    return Step()


def is_scaling_event(state: FleetState) -> bool:
    """``spec.replicas`` changed since the active revisions were last sized."""
    return any(r.size > 0 and r.desired is not None and r.desired != state.replicas for r in state.all)


def _is_saturated(state: FleetState) -> bool:
    new = state.new
    return (
        new.size == state.replicas
        and new.desired == state.replicas
        and new.available(state.min_ready_s, state.now) == state.replicas
    )


def _proportion(revision: Revision, state: FleetState, to_add: int, added: int, fleet_replicas_before: int) -> int:
    """``GetProportion``: this revision's share of the change, capped by what is left."""
    if revision.size == 0 or to_add == 0 or to_add == added:
        return 0
    if state.replicas == 0:
        fraction = -revision.size
    else:
        before = revision.max_replicas or fleet_replicas_before
        if before == 0:
            fraction = 0
        else:
            # Go's math.Round (halves away from zero), in integers: sizes are never negative.
            scaled = revision.size * (state.replicas + state.max_surge)
            fraction = (2 * scaled + before) // (2 * before) - revision.size
    allowed = to_add - added
    return min(fraction, allowed) if to_add > 0 else max(fraction, allowed)


def proportional_step(state: FleetState, fleet_replicas_before: int) -> Step:
    """``sync``/``scale``: apply a change of ``spec.replicas`` in the middle of a rollout by
    resizing every active revision in proportion, so the rollout's progress is kept.
    ``fleet_replicas_before`` is ``status.replicas``, the fallback when a revision carries no
    sizing annotation."""
    active = [r for r in state.all if r.size > 0]
    if len(active) <= 1:  # ``FindActiveOrLatest``: the one active revision, else the newest
        target = active[0] if active else state.new
        return Step({target.hash: state.replicas}, "scaled the fleet's only active revision")
    if _is_saturated(state):
        return Step({r.hash: 0 for r in state.old if r.size > 0}, "scaled down old revisions: the new one is saturated")
    if state.strategy != "RollingUpdate":
        return Step()
    allowed = state.replicas + state.max_surge if state.replicas > 0 else 0
    to_add = allowed - sum(r.size for r in active)
    # Larger first; on a tie, newer first when growing and older first when shrinking.
    newer_first = to_add > 0
    active.sort(key=lambda r: (-r.size, -r.created if newer_first else r.created, r.number))
    sizes: dict[str, int] = {}
    added = 0
    for revision in active:
        share = _proportion(revision, state, to_add, added, fleet_replicas_before) if to_add else 0
        sizes[revision.hash] = revision.size + share
        added += share
    if to_add:
        largest = active[0].hash
        sizes[largest] = max(sizes[largest] + to_add - added, 0)
    return Step(sizes, "scaled revisions in proportion to a change of replicas")


def is_complete(state: FleetState, total_existing: int) -> bool:
    """Every cluster runs the new template and is available (``DeploymentComplete``);
    ``total_existing`` counts every cluster of the fleet, broken and terminating ones too."""
    return (
        state.new.size == state.replicas
        and total_existing == state.replicas
        and state.new.available(state.min_ready_s, state.now) == state.replicas
    )


def history_to_prune(old: tuple[Revision, ...], limit: int, has_clusters: set[str]) -> list[Revision]:
    """``cleanupDeployment``: of the old revisions beyond ``revisionHistoryLimit`` (oldest
    first), the records that have no cluster left (not even a terminating one)."""
    excess = sorted(old, key=lambda r: r.number)[: max(len(old) - limit, 0)]
    return [r for r in excess if r.hash not in has_clusters]
