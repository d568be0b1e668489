"""The fleet's status conditions against Deployment's (``pkg/controller/deployment/progress.go``,
``sync.go`` ``syncRolloutStatus`` and ``util`` ``SetDeploymentCondition``)."""

from __future__ import annotations

from typing import Literal

from fleet.api import Condition, FleetStatus
from fleet.clusters import ClusterView
from fleet.progress import (
    AVAILABLE,
    MIN_AVAILABLE,
    MIN_UNAVAILABLE,
    NEW_REVISION_AVAILABLE,
    NEW_REVISION_CREATED,
    PAUSED,
    PROGRESSING,
    RESUMED,
    REVISION_UPDATED,
    TIMED_OUT,
    Counts,
    availability,
    fleet_counts,
    made_progress,
    paused_condition,
    progress_deadline_at,
    rollout_conditions,
    set_condition,
    timed_out,
    timestamp,
)
from fleet.rollout import FleetState, Revision

T0 = 1_700_000_000.0
DEADLINE = 600


def progressing(status: Literal["True", "False", "Unknown"], reason: str, at: float, since: float | None = None) -> Condition:
    """A stored Progressing condition last updated ``at``, in its status ``since``."""
    return Condition(type=PROGRESSING, status=status, reason=reason, lastUpdateTime=timestamp(at),
                     lastTransitionTime=timestamp(at if since is None else since))  # fmt: skip


def the(conditions: list[Condition], kind: str) -> Condition:
    found = [c for c in conditions if c.type == kind]
    assert len(found) == 1, conditions
    return found[0]


# -- SetDeploymentCondition -------------------------------------------------------------------


def test_set_condition_adds_with_both_times() -> None:
    conditions = set_condition([], Condition(type=AVAILABLE, status="True", reason=MIN_AVAILABLE), T0)
    assert the(conditions, AVAILABLE).lastUpdateTime == the(conditions, AVAILABLE).lastTransitionTime == timestamp(T0)


def test_set_condition_same_status_and_reason_changes_nothing() -> None:
    conditions = set_condition([], Condition(type=AVAILABLE, status="True", reason=MIN_AVAILABLE), T0)
    again = set_condition(conditions, Condition(type=AVAILABLE, status="True", reason=MIN_AVAILABLE, message="new"), T0 + 60)
    assert again == conditions


def test_set_condition_keeps_transition_time_while_status_holds() -> None:
    conditions = [progressing("True", NEW_REVISION_CREATED, T0)]
    updated = set_condition(conditions, Condition(type=PROGRESSING, status="True", reason=REVISION_UPDATED), T0 + 60)
    assert (the(updated, PROGRESSING).lastUpdateTime, the(updated, PROGRESSING).lastTransitionTime) == (timestamp(T0 + 60), timestamp(T0))
    flipped = set_condition(updated, Condition(type=PROGRESSING, status="False", reason=TIMED_OUT), T0 + 120)
    assert (the(flipped, PROGRESSING).lastUpdateTime, the(flipped, PROGRESSING).lastTransitionTime) == (timestamp(T0 + 120),) * 2


def test_set_condition_leaves_other_types_alone() -> None:
    available = Condition(type=AVAILABLE, status="True", reason=MIN_AVAILABLE)
    conditions = set_condition(set_condition([], available, T0), Condition(type=PROGRESSING, status="True", reason=REVISION_UPDATED), T0)
    assert [c.type for c in conditions] == [AVAILABLE, PROGRESSING]


# -- Available ----------------------------------------------------------------------------------


def counts(replicas: int = 10, updated: int = 0, ready: int = 0, available: int = 0) -> Counts:
    return Counts(replicas=replicas, updated=updated, ready=ready, available=available, unavailable=max(0, replicas - available))


def test_availability_true_at_the_floor_false_below() -> None:
    at_floor = availability([], counts(available=8), 10, 2, T0)
    assert (the(at_floor, AVAILABLE).status, the(at_floor, AVAILABLE).reason) == ("True", MIN_AVAILABLE)
    below = availability(at_floor, counts(available=7), 10, 2, T0 + 5)
    assert (the(below, AVAILABLE).status, the(below, AVAILABLE).reason) == ("False", MIN_UNAVAILABLE)
    assert the(below, AVAILABLE).lastTransitionTime == timestamp(T0 + 5)
    still = availability(below, counts(available=6), 10, 2, T0 + 9)
    assert the(still, AVAILABLE).lastTransitionTime == timestamp(T0 + 5)


def test_availability_of_an_empty_fleet() -> None:
    conditions = availability([], counts(replicas=0), 0, 0, T0)
    assert the(conditions, AVAILABLE).status == "True"


# -- Progressing (syncRolloutStatus) -------------------------------------------------------------


def before(replicas: int = 13, updated: int = 3, ready: int = 10, available: int = 10) -> FleetStatus:
    return FleetStatus(replicas=replicas, updatedReplicas=updated, readyReplicas=ready, availableReplicas=available)


def test_made_progress_mirrors_deployment_progressing() -> None:
    stored = before(replicas=13, updated=3, ready=10, available=10)
    assert made_progress(stored, counts(replicas=13, updated=4, ready=10, available=10))  # more updated
    assert made_progress(stored, counts(replicas=11, updated=3, ready=10, available=10))  # fewer old
    assert made_progress(stored, counts(replicas=13, updated=3, ready=11, available=10))  # more ready
    assert made_progress(stored, counts(replicas=13, updated=3, ready=10, available=11))  # more available
    assert not made_progress(stored, counts(replicas=13, updated=3, ready=10, available=10))
    assert not made_progress(stored, counts(replicas=12, updated=2, ready=9, available=9))  # a new one broke


def test_rollout_conditions_complete() -> None:
    conditions = [progressing("True", REVISION_UPDATED, T0 - 50, since=T0 - 100)]
    done = rollout_conditions(before(), conditions, counts(replicas=10, updated=10, ready=10, available=10), True, "f-x", DEADLINE, T0)
    condition = the(done, PROGRESSING)
    assert (condition.status, condition.reason) == ("True", NEW_REVISION_AVAILABLE)
    assert (condition.lastUpdateTime, condition.lastTransitionTime) == (timestamp(T0), timestamp(T0 - 100))


def test_rollout_conditions_leave_a_finished_rollout_alone() -> None:
    """A resync after completion estimates nothing, even long past the deadline."""
    conditions = [progressing("True", NEW_REVISION_AVAILABLE, T0 - 10 * DEADLINE)]
    now = counts(replicas=10, updated=10, ready=9, available=9)
    assert rollout_conditions(before(10, 10, 10, 10), conditions, now, False, "f-x", DEADLINE, T0) == conditions


def test_progress_moves_last_update_time_and_keeps_transition_time() -> None:
    conditions = [progressing("True", NEW_REVISION_CREATED, T0 - 100)]
    moved = rollout_conditions(before(), conditions, counts(replicas=13, updated=5, ready=10, available=10), False, "f-x", DEADLINE, T0)
    condition = the(moved, PROGRESSING)
    assert (condition.status, condition.reason) == ("True", REVISION_UPDATED)
    assert (condition.lastUpdateTime, condition.lastTransitionTime) == (timestamp(T0), timestamp(T0 - 100))
    # Progress again with the same reason: set_condition alone would not move lastUpdateTime.
    again = rollout_conditions(before(13, 5, 10, 10), moved, counts(replicas=13, updated=5, ready=11, available=10),
                               False, "f-x", DEADLINE, T0 + 30)  # fmt: skip
    assert (the(again, PROGRESSING).lastUpdateTime, the(again, PROGRESSING).lastTransitionTime) == (timestamp(T0 + 30), timestamp(T0 - 100))


def test_progress_after_a_timeout_flips_back_to_true() -> None:
    conditions = [progressing("False", TIMED_OUT, T0 - 100)]
    moved = rollout_conditions(before(), conditions, counts(replicas=13, updated=4, ready=10, available=10), False, "f-x", DEADLINE, T0)
    condition = the(moved, PROGRESSING)
    assert (condition.status, condition.reason, condition.lastTransitionTime) == ("True", REVISION_UPDATED, timestamp(T0))


def test_no_progress_times_out_only_after_the_deadline() -> None:
    conditions = [progressing("True", REVISION_UPDATED, T0)]
    stuck = counts(replicas=13, updated=3, ready=10, available=10)
    assert rollout_conditions(before(), conditions, stuck, False, "f-x", DEADLINE, T0 + DEADLINE - 1) == conditions
    assert rollout_conditions(before(), conditions, stuck, False, "f-x", DEADLINE, T0 + DEADLINE) == conditions  # not yet: strictly after
    late = rollout_conditions(before(), conditions, stuck, False, "f-x", DEADLINE, T0 + DEADLINE + 1)
    condition = the(late, PROGRESSING)
    assert (condition.status, condition.reason, condition.lastTransitionTime) == ("False", TIMED_OUT, timestamp(T0 + DEADLINE + 1))
    # Still stuck later: the timed-out condition stays as it was.
    assert rollout_conditions(before(), late, stuck, False, "f-x", DEADLINE, T0 + 5 * DEADLINE) == late


def test_timed_out() -> None:
    assert not timed_out([], DEADLINE, T0)
    assert not timed_out([progressing("True", NEW_REVISION_AVAILABLE, T0 - 10 * DEADLINE)], DEADLINE, T0)
    assert timed_out([progressing("False", TIMED_OUT, T0)], DEADLINE, T0)
    assert timed_out([progressing("True", REVISION_UPDATED, T0 - DEADLINE - 1)], DEADLINE, T0)
    assert not timed_out([progressing("True", REVISION_UPDATED, T0 - DEADLINE)], DEADLINE, T0)


def test_progress_deadline_at() -> None:
    assert progress_deadline_at([progressing("True", REVISION_UPDATED, T0)], DEADLINE) == T0 + DEADLINE
    assert progress_deadline_at([progressing("True", NEW_REVISION_AVAILABLE, T0)], DEADLINE) is None
    assert progress_deadline_at([progressing("False", TIMED_OUT, T0)], DEADLINE) is None
    assert progress_deadline_at([], DEADLINE) is None


# -- Paused (checkPausedConditions) ----------------------------------------------------------------


def test_pause_and_resume() -> None:
    conditions = [progressing("True", REVISION_UPDATED, T0 - 100)]
    paused = paused_condition(conditions, True, T0)
    assert (the(paused, PROGRESSING).status, the(paused, PROGRESSING).reason) == ("Unknown", PAUSED)
    assert paused_condition(paused, True, T0 + 5) == paused
    resumed = paused_condition(paused, False, T0 + 10)
    condition = the(resumed, PROGRESSING)
    assert (condition.status, condition.reason) == ("Unknown", RESUMED)
    assert condition.lastTransitionTime == timestamp(T0)  # still Unknown since the pause
    assert paused_condition(conditions, False, T0) == conditions


def test_timed_out_condition_survives_pause() -> None:
    conditions = [progressing("False", TIMED_OUT, T0 - 100)]
    assert paused_condition(conditions, True, T0) == conditions
    assert paused_condition(conditions, False, T0) == conditions


# -- Counts (calculateStatus) ---------------------------------------------------------------------


def test_fleet_counts() -> None:
    def cluster(name: str, revision: str, ready: bool, since: float | None = None) -> ClusterView:
        return ClusterView(name=name, revision=revision, created=T0 - 500, deleting=False, provisioned=ready, ready=ready,
                           ready_since=since)  # fmt: skip

    new = Revision("b", 2, T0 - 500, (cluster("b-1", "b", True, T0 - 100), cluster("b-2", "b", True, T0 - 5),
                                      cluster("b-3", "b", False)))  # fmt: skip
    old = Revision("a", 1, T0 - 9000, (cluster("a-1", "a", True, T0 - 9000),))
    state = FleetState(replicas=3, strategy="RollingUpdate", max_surge=1, max_unavailable=0, min_ready_s=30, new=new, old=(old,), now=T0)
    assert fleet_counts(state) == Counts(replicas=4, updated=3, ready=3, available=2, unavailable=2)
