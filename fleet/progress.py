"""The fleet's status: replica counts and Deployment-style conditions, as pure functions.

``Available`` says whether the fleet serves at its floor (``replicas - maxUnavailable``);
``Progressing`` tells a rollout's story (created, updated, complete, timed out, paused) with
Deployment's reasons, so tools that read Deployments read fleets; ``ReplicaFailure`` carries
the last cluster create or delete the API server refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fleet.api import Condition, FleetStatus
from fleet.clusters import parse_time
from fleet.rollout import FleetState

AVAILABLE, PROGRESSING, REPLICA_FAILURE = "Available", "Progressing", "ReplicaFailure"
# Deployment's reasons (k8s.io/kubernetes/pkg/controller/deployment/util)
MIN_AVAILABLE, MIN_UNAVAILABLE = "MinimumReplicasAvailable", "MinimumReplicasUnavailable"
NEW_REVISION_CREATED, FOUND_NEW_REVISION = "NewReplicaSetCreated", "FoundNewReplicaSet"
REVISION_UPDATED, NEW_REVISION_AVAILABLE = "ReplicaSetUpdated", "NewReplicaSetAvailable"
TIMED_OUT, PAUSED, RESUMED = "ProgressDeadlineExceeded", "DeploymentPaused", "DeploymentResumed"
INVALID_SPEC = "InvalidSpec"


def timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Counts:
    replicas: int
    updated: int
    ready: int
    available: int
    unavailable: int


def fleet_counts(state: FleetState) -> Counts:
    total = state.total()
    available = state.available()
    return Counts(
        replicas=total,
        updated=state.new.size,
        ready=sum(r.ready() for r in state.all),
        available=available,
        unavailable=max(0, total - available),
    )


def set_condition(conditions: list[Condition], new: Condition, now: float) -> list[Condition]:
    """``SetDeploymentCondition``: nothing changes if status and reason are the same;
    otherwise replace it, keeping ``lastTransitionTime`` when the status did not flip."""
    current = next((c for c in conditions if c.type == new.type), None)
    if current is not None and current.status == new.status and current.reason == new.reason:
        return conditions
    stamp = timestamp(now)
    transition = current.lastTransitionTime if current is not None and current.status == new.status else stamp
    updated = new.model_copy(update={"lastUpdateTime": stamp, "lastTransitionTime": transition})
    return [c for c in conditions if c.type != new.type] + [updated]


def remove_condition(conditions: list[Condition], kind: str) -> list[Condition]:
    return [c for c in conditions if c.type != kind]


def availability(conditions: list[Condition], counts: Counts, replicas: int, max_unavailable: int, now: float) -> list[Condition]:
    if counts.available >= replicas - max_unavailable:
        condition = Condition(type=AVAILABLE, status="True", reason=MIN_AVAILABLE, message="Fleet has minimum availability.")
    else:
        condition = Condition(
            type=AVAILABLE, status="False", reason=MIN_UNAVAILABLE,
            message=f"{counts.available} of {replicas} clusters available; the floor is {replicas - max_unavailable}.",
        )  # fmt: skip
    return set_condition(conditions, condition, now)


def paused_condition(conditions: list[Condition], paused: bool, now: float) -> list[Condition]:
    """``checkPausedConditions``: a timed-out rollout keeps saying so even when paused."""
    current = next((c for c in conditions if c.type == PROGRESSING), None)
    if current is not None and current.reason == TIMED_OUT:
        return conditions
    is_paused = current is not None and current.reason == PAUSED
    if paused and not is_paused:
        return set_condition(conditions, Condition(type=PROGRESSING, status="Unknown", reason=PAUSED, message="Fleet is paused"), now)
    if not paused and is_paused:
        return set_condition(conditions, Condition(type=PROGRESSING, status="Unknown", reason=RESUMED, message="Fleet is resumed"), now)
    return conditions


def made_progress(before: FleetStatus, after: Counts) -> bool:
    """``DeploymentProgressing``: more updated, fewer old, more ready or more available."""
    return (
        after.updated > before.updatedReplicas
        or after.replicas - after.updated < before.replicas - before.updatedReplicas
        or after.ready > before.readyReplicas
        or after.available > before.availableReplicas
    )


def timed_out(conditions: list[Condition], deadline_s: int, now: float) -> bool:
    """``DeploymentTimedOut``: no progress noted for ``progressDeadlineSeconds``."""
    current = next((c for c in conditions if c.type == PROGRESSING), None)
    if current is None or current.reason == NEW_REVISION_AVAILABLE:
        return False
    if current.reason == TIMED_OUT:
        return True
    since = parse_time(current.lastUpdateTime)
    return since is not None and since + deadline_s < now


def progress_deadline_at(conditions: list[Condition], deadline_s: int) -> float | None:
    """When the rollout times out if nothing moves: the controller re-checks then."""
    current = next((c for c in conditions if c.type == PROGRESSING), None)
    if current is None or current.status != "True" or current.reason == NEW_REVISION_AVAILABLE:
        return None
    since = parse_time(current.lastUpdateTime)
    return None if since is None else since + deadline_s


def rollout_conditions(
    before: FleetStatus, conditions: list[Condition], counts: Counts, complete: bool, new_name: str,
    deadline_s: int, now: float,
) -> list[Condition]:  # fmt: skip
    """``syncRolloutStatus``'s Progressing estimate. ``conditions`` already has this
    reconcile's Available (and any NewReplicaSetCreated); ``before`` is the stored status."""
    current = next((c for c in conditions if c.type == PROGRESSING), None)
    if counts.replicas == counts.updated and current is not None and current.reason == NEW_REVISION_AVAILABLE:
        return conditions  # a resync of a finished rollout: nothing to estimate
    if complete:
        done = Condition(type=PROGRESSING, status="True", reason=NEW_REVISION_AVAILABLE,
                         message=f"Revision {new_name!r} has successfully progressed.")  # fmt: skip
        return set_condition(conditions, done, now)
    if made_progress(before, counts):
        # Same reason, new lastUpdateTime: progress moves the deadline (set_condition would not).
        stamp = timestamp(now)
        transition = current.lastTransitionTime if current is not None and current.status == "True" else stamp
        moving = Condition(type=PROGRESSING, status="True", reason=REVISION_UPDATED,
                           message=f"Revision {new_name!r} is progressing.",
                           lastUpdateTime=stamp, lastTransitionTime=transition)  # fmt: skip
        return remove_condition(conditions, PROGRESSING) + [moving]
    if timed_out(conditions, deadline_s, now):
        stuck = Condition(type=PROGRESSING, status="False", reason=TIMED_OUT,
                          message=f"Revision {new_name!r} has timed out progressing.")  # fmt: skip
        return set_condition(conditions, stuck, now)
    return conditions
