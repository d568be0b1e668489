"""The rollout maths against the Kubernetes Deployment controller's own unit tests, then
over whole simulated rollouts.

Each table mirrors a Go test in ``pkg/controller/deployment`` (named on the table), with a
ReplicaSet's ``spec.replicas`` read as a revision's number of active clusters and its
``status.availableReplicas`` as how many of them are available: the tables say what a port
must do case by case. The simulation at the end (a fleet's clusters and a fake KubeRay,
driven one reconcile step per tick) says what it must never do over a whole rollout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.api import Condition, FleetStatus
from fleet.clusters import ClusterView, victims
from fleet.progress import (
    AVAILABLE,
    NEW_REVISION_AVAILABLE,
    NEW_REVISION_CREATED,
    PROGRESSING,
    TIMED_OUT,
    availability,
    fleet_counts,
    rollout_conditions,
    set_condition,
)
from fleet.rollout import (
    FleetState,
    Revision,
    Step,
    StrategyType,
    history_to_prune,
    is_complete,
    is_scaling_event,
    new_revision_size,
    proportional_step,
    recreate_step,
    resolve_fenceposts,
    rolling_step,
    scale_down_old,
    scale_up_new,
)

NOW = 1_000_000.0
LONG_AGO = NOW - 3600


def cluster(name: str, revision_hash: str, created: float, ready_since: float | None) -> ClusterView:
    """A cluster of ``revision_hash``: ready since ``ready_since``, or still starting if None."""
    ready = ready_since is not None
    return ClusterView(name=name, revision=revision_hash, created=created, deleting=False, provisioned=ready,
                       ready=ready, ready_since=ready_since)  # fmt: skip


def revision(
    name: str, number: int, available: int = 0, not_ready: int = 0, warming: int = 0,
    desired: int | None = None, max_replicas: int | None = None,
) -> Revision:  # fmt: skip
    """A revision whose ``number`` is also its creation time (so higher is newer), with
    ``available`` clusters ready long ago, ``warming`` ones ready just now (available only
    when minReadySeconds is 0) and ``not_ready`` ones still starting."""
    since: list[float | None] = [LONG_AGO] * available + [NOW] * warming + [None] * not_ready
    clusters = tuple(cluster(f"{name}-{i}", name, float(number), ready) for i, ready in enumerate(since))
    return Revision(hash=name, number=number, created=float(number), clusters=clusters,
                    desired=desired, max_replicas=max_replicas)  # fmt: skip


def fleet(
    replicas: int, new: Revision, *old: Revision, max_surge: int | str = 0, max_unavailable: int | str = 0,
    strategy: StrategyType = "RollingUpdate", min_ready_s: int = 0, old_terminating: int = 0,
) -> FleetState:  # fmt: skip
    """A fleet state with its fenceposts resolved as the controller resolves them (the Go
    tests' ``newDeployment`` defaults both to 0, which resolves to maxUnavailable 1)."""
    surge, unavailable = resolve_fenceposts(max_surge, max_unavailable, replicas)
    return FleetState(replicas=replicas, strategy=strategy, max_surge=surge, max_unavailable=unavailable,
                      min_ready_s=min_ready_s, new=new, old=old, now=NOW, old_terminating=old_terminating)  # fmt: skip


def sizes_after(state: FleetState, step: Step) -> dict[str, int]:
    """Every revision's size once ``step`` is applied (revisions it does not name keep theirs)."""
    return {r.hash: step.sizes.get(r.hash, r.size) for r in state.all}


# -- ResolveFenceposts (util/deployment_util_test.go TestResolveFenceposts, TestMaxUnavailable) --


@pytest.mark.parametrize(
    ("max_surge", "max_unavailable", "replicas", "expected"),
    [
        ("39%", "39%", 10, (4, 3)),  # surge rounds up, unavailable rounds down
        (0, "39%", 10, (0, 3)),
        ("39%", 0, 10, (4, 0)),
        (0, 0, 10, (0, 1)),  # both zero: unavailable 1, or no move is ever possible
        ("25%", "25%", 10, (3, 2)),
        ("1%", "1%", 10, (1, 0)),
        (0, "10%", 5, (0, 1)),  # 0.5 rounds down to 0: both zero again
        ("100%", "100%", 3, (3, 3)),
        (1, 20, 5, (1, 5)),  # MaxUnavailable caps at replicas
        ("0%", "0%", 0, (0, 0)),  # ResolveFenceposts says 1, MaxUnavailable caps it at 0 replicas
        (" 50% ", "50%", 4, (2, 2)),
    ],
)
def test_resolve_fenceposts(max_surge: int | str, max_unavailable: int | str, replicas: int, expected: tuple[int, int]) -> None:
    assert resolve_fenceposts(max_surge, max_unavailable, replicas) == expected


@pytest.mark.parametrize(
    ("max_surge", "max_unavailable"),
    [("oops", "39%"), ("55%", "urg"), ("5", 1), (1, "%"), ("1.5%", 1), (-1, 1), (1, -2), ("-10%", 1)],
)
def test_resolve_fenceposts_rejects_bad_values(max_surge: int | str, max_unavailable: int | str) -> None:
    with pytest.raises(ValueError):
        resolve_fenceposts(max_surge, max_unavailable, 10)


# -- NewRSNewReplicas and reconcileNewReplicaSet (deployment_util_test.go, rolling_test.go) --


@pytest.mark.parametrize(
    ("strategy", "replicas", "new_size", "max_surge", "expected"),
    [
        ("RollingUpdate", 1, 5, 1, 5),  # can not scale up: already past replicas + surge
        ("RollingUpdate", 6, 2, 10, 6),  # scale up, but never past replicas
        ("Recreate", 3, 1, 1, 3),  # Recreate: straight to replicas
    ],
)
def test_new_revision_size_mirrors_new_rs_new_replicas(
    strategy: StrategyType, replicas: int, new_size: int, max_surge: int, expected: int
) -> None:
    # TestNewRSNewReplicas: one other ReplicaSet of 5 replicas exists.
    state = fleet(replicas, revision("new", 2, available=new_size), revision("old", 1, available=5),
                  max_surge=max_surge, max_unavailable=1, strategy=strategy)  # fmt: skip
    assert new_revision_size(state) == expected


@pytest.mark.parametrize(
    ("replicas", "max_surge", "old_size", "new_size", "expected_new"),
    [
        (10, 0, 10, 0, None),  # should not scale up when the old revision is fully saturated
        (10, 2, 10, 0, 2),  # scale up according to maxSurge when the old one is saturated
        (10, 2, 5, 0, 7),  # scale up according to maxSurge
        (10, 2, 10, 2, None),  # should not scale when maxSurge is fully used
        (10, 2, 2, 11, 10),  # scale down when the new revision is above replicas
        (2, 0, 2, 4, 2),
    ],
)
def test_scale_up_new_mirrors_reconcile_new_replica_set(
    replicas: int, max_surge: int, old_size: int, new_size: int, expected_new: int | None
) -> None:
    state = fleet(replicas, revision("new", 2, not_ready=new_size), revision("old", 1, available=old_size),
                  max_surge=max_surge, max_unavailable=0)  # fmt: skip
    step = scale_up_new(state)
    assert step.sizes == ({} if expected_new is None else {"new": expected_new})
    assert bool(step) is (expected_new is not None)


# -- reconcileOldReplicaSets, cleanupUnhealthyReplicas, scaleDownOldReplicaSetsForRollingUpdate --


@pytest.mark.parametrize(
    ("replicas", "max_unavailable", "old_size", "old_available", "new_size", "new_available", "expected_old"),
    [
        # TestDeploymentController_reconcileOldReplicaSets (maxSurge 0)
        (10, 0, 10, 10, 0, 0, 9),  # 0/0 resolves to maxUnavailable 1
        (10, 2, 10, 10, 0, 0, 8),
        (10, 2, 10, 8, 0, 0, 8),  # the 2 unhealthy ones are cleaned up
        (10, 2, 10, 9, 0, 0, 8),  # 1 unhealthy cleaned up, then 1 available scaled down
        (10, 2, 8, 8, 2, 0, None),  # the new revision's unavailable clusters use the budget
        # TestDeploymentController_scaleDownOldReplicaSetsForRollingUpdate (no new ReplicaSet)
        (10, 2, 0, 0, 0, 0, None),  # nothing old to scale down
        (10, 2, 10, 1, 0, 0, 8),  # in isolation nothing is available to remove; cleanup removes 2
        (1, 2, 1, 1, 0, 0, 0),  # maxUnavailable capped at replicas: floor 0
    ],
)
def test_scale_down_old_mirrors_reconcile_old_replica_sets(
    replicas: int, max_unavailable: int, old_size: int, old_available: int, new_size: int, new_available: int,
    expected_old: int | None,
) -> None:  # fmt: skip
    old = revision("old", 1, available=old_available, not_ready=old_size - old_available)
    new = revision("new", 2, available=new_available, not_ready=new_size - new_available)
    step = scale_down_old(fleet(replicas, new, old, max_surge=0, max_unavailable=max_unavailable))
    assert step.sizes == ({} if expected_old is None else {"old": expected_old})


@pytest.mark.parametrize(
    ("max_unavailable", "expected_old"),
    [
        # TestDeploymentController_cleanupUnhealthyReplicas: 10 old, 8 ready, 2 unhealthy. Next
        # to 3 starting new clusters and maxSurge 3, the budget maxScaledDown (13 - floor - 3)
        # equals maxUnavailable, and the floor (10 - maxUnavailable) lets no available cluster
        # go until the budget exceeds the unhealthy count.
        (1, 9),  # budget 1: 1 cleaned
        (2, 8),  # budget 2: both cleaned
        (0, 10),  # budget 0: nothing
        (3, 7),  # budget 3: only 2 unhealthy to clean; the third is an available one above the floor
    ],
)
def test_cleanup_unhealthy_is_bounded_by_budget_and_unhealthy_count(max_unavailable: int, expected_old: int) -> None:
    state = fleet(10, revision("new", 2, not_ready=3), revision("old", 1, available=8, not_ready=2),
                  max_surge=3, max_unavailable=max_unavailable)  # fmt: skip
    assert sizes_after(state, scale_down_old(state))["old"] == expected_old


def test_cleanup_unhealthy_all_healthy_removes_only_available_excess() -> None:
    # cleanupUnhealthyReplicas case 4: 10 ready, budget 3 → no cleanup; the scale-down then
    # removes available ones down to the floor.
    state = fleet(10, revision("new", 2), revision("old", 1, available=10), max_surge=0, max_unavailable=3)
    assert scale_down_old(state).sizes == {"old": 7}


def test_scale_down_old_cleans_unhealthy_in_any_revision_before_available_ones() -> None:
    """Removing an unavailable cluster costs no availability, so it goes first even when it
    sits in a newer old revision than the available ones."""
    oldest = revision("oldest", 1, available=5)
    older = revision("older", 2, not_ready=5)
    state = fleet(10, revision("new", 3), oldest, older, max_surge=0, max_unavailable=2)
    # maxScaledDown = 10 - 8 - 0 = 2; available 5 is under the floor 8: cleanup only.
    assert scale_down_old(state).sizes == {"older": 3}


def test_scale_down_old_removes_oldest_first() -> None:
    state = fleet(10, revision("new", 3, available=4), revision("b", 2, available=3), revision("a", 1, available=3),
                  max_surge=0, max_unavailable=3)  # fmt: skip
    # floor 7, available 10: 3 go, all from the oldest revision "a".
    assert scale_down_old(state).sizes == {"a": 0}
    state = fleet(10, revision("new", 3, available=4), revision("b", 2, available=3), revision("a", 1, available=3),
                  max_surge=0, max_unavailable=5)  # fmt: skip
    assert scale_down_old(state).sizes == {"a": 0, "b": 1}


def test_scale_down_old_respects_min_ready_seconds() -> None:
    """A ready cluster that has not been ready for minReadySeconds is not available yet: it
    counts as unhealthy (cleaned up first) and not towards the floor."""
    old = revision("old", 1, available=8, warming=2)
    state = fleet(10, revision("new", 2), old, max_surge=0, max_unavailable=2, min_ready_s=30)
    assert state.available() == 8
    # maxScaledDown 2 → the 2 warming ones are cleaned; available 8 is at the floor.
    assert scale_down_old(state).sizes == {"old": 8}


def test_rolling_step_scales_up_first_then_down() -> None:
    old = revision("old", 1, available=10)
    state = fleet(10, revision("new", 2), old, max_surge=3, max_unavailable=2)
    assert rolling_step(state).sizes == {"new": 3}
    state = fleet(10, revision("new", 2, not_ready=3), old, max_surge=3, max_unavailable=2)
    assert rolling_step(state).sizes == {"old": 8}  # surge used up: old ones go, to the floor
    done = fleet(10, revision("new", 2, available=10), revision("old", 1), max_surge=3, max_unavailable=2)
    assert not rolling_step(done)


# -- rolloutRecreate (recreate.go) ------------------------------------------------------------


def test_recreate_scales_every_old_revision_to_zero_first() -> None:
    state = fleet(3, revision("new", 3), revision("a", 1, available=2), revision("b", 2, not_ready=1),
                  revision("empty", 0), strategy="Recreate")  # fmt: skip
    assert recreate_step(state).sizes == {"a": 0, "b": 0}


def test_recreate_waits_for_terminating_old_clusters() -> None:
    state = fleet(3, revision("new", 3), revision("a", 1), strategy="Recreate", old_terminating=2)
    assert not recreate_step(state)


@pytest.mark.parametrize(("new_size", "expected"), [(0, {"new": 3}), (5, {"new": 3}), (3, {})])
def test_recreate_then_sizes_the_new_revision(new_size: int, expected: dict[str, int]) -> None:
    state = fleet(3, revision("new", 3, not_ready=new_size), revision("a", 1), strategy="Recreate")
    assert recreate_step(state).sizes == expected


# -- isScalingEvent and scale (sync.go, sync_test.go TestScale) -------------------------------


def test_is_scaling_event() -> None:
    assert is_scaling_event(fleet(5, revision("new", 2, available=3, desired=3)))
    assert is_scaling_event(fleet(5, revision("new", 2, available=2, desired=5), revision("old", 1, available=2, desired=4)))
    assert not is_scaling_event(fleet(5, revision("new", 2, available=3, desired=5)))
    assert not is_scaling_event(fleet(5, revision("new", 2, available=3)))  # no annotation: not a scaling event
    assert not is_scaling_event(fleet(5, revision("new", 2, desired=5), revision("old", 1, desired=9)))  # inactive


OLD_TIME, OLDER_TIME = 2, 1


@pytest.mark.parametrize(
    ("replicas", "max_surge", "before", "before_surge", "new", "old", "expected"),
    [
        # name: (replicas, maxSurge) now, (replicas, maxSurge) before, new (size, created), old [(name, size, created)]
        pytest.param(12, 0, 10, 0, 10, [], {"new": 12}, id="normal scaling event: 10 -> 12"),
        pytest.param(5, 0, 10, 0, 10, [], {"new": 5}, id="normal scaling event: 10 -> 5"),
        pytest.param(10, 0, 5, 0, 2, [("v1", 3, OLD_TIME)], {"new": 4, "v1": 6}, id="proportional scaling: 5 -> 10"),
        pytest.param(3, 0, 5, 0, 2, [("v1", 3, OLD_TIME)], {"new": 1, "v1": 2}, id="proportional scaling: 5 -> 3"),
        pytest.param(4, 0, 9, 0, 8, [("v1", 1, OLD_TIME)], {"new": 4, "v1": 0}, id="proportional scaling: 9 -> 4"),
        pytest.param(10, 0, 7, 0, 2, [("v2", 3, OLD_TIME), ("v1", 2, OLDER_TIME)], {"new": 3, "v2": 4, "v1": 3},
                     id="proportional scaling: 7 -> 10"),
        pytest.param(8, 0, 13, 0, 2, [("v2", 8, OLD_TIME), ("v1", 3, OLDER_TIME)], {"new": 1, "v2": 5, "v1": 2},
                     id="proportional scaling: 13 -> 8"),
        pytest.param(4, 0, 3, 0, 1, [("v2", 1, OLD_TIME), ("v1", 1, OLDER_TIME)], {"new": 2, "v2": 1, "v1": 1},
                     id="leftover distribution: 3 -> 4 (to the newest of the largest)"),
        pytest.param(2, 0, 3, 0, 1, [("v2", 1, OLD_TIME), ("v1", 1, OLDER_TIME)], {"new": 1, "v2": 1, "v1": 0},
                     id="leftover distribution: 3 -> 2 (from the oldest of the largest)"),
        pytest.param(5, 0, 4, 0, 0, [("v2", 2, OLD_TIME), ("v1", 2, OLDER_TIME)], {"new": 0, "v2": 3, "v1": 2},
                     id="proportional scaling (no new revision): 4 -> 5"),
        pytest.param(0, 0, 6, 0, 3, [("v2", 2, OLD_TIME), ("v1", 1, OLDER_TIME)], {"new": 0, "v2": 0, "v1": 0},
                     id="proportional scaling: 6 -> 0"),
        pytest.param(6, 0, 6, 0, 0, [("v2", 0, OLD_TIME), ("v1", 0, OLDER_TIME)], {"new": 6, "v2": 0, "v1": 0},
                     id="proportional scaling: 0 -> 6 (nothing active: the new revision)"),
        pytest.param(20, 2, 10, 2, 6, [("v1", 6, OLD_TIME)], {"new": 11, "v1": 11}, id="deployment with surge pods"),
        pytest.param(50, 6, 10, 3, 5, [("v1", 8, OLD_TIME)], {"new": 22, "v1": 34}, id="change both surge and size"),
        pytest.param(14, 0, 10, 0, 0, [("v2", 7, OLD_TIME), ("v1", 3, OLDER_TIME)], {"new": 0, "v2": 10, "v1": 4},
                     id="change both size and template"),
        # Go rounds a revision's share half away from zero (``math.Round``), not half to even.
        pytest.param(1, 0, 4, 0, 2, [("v1", 1, OLD_TIME)], {"new": 1, "v1": 0},
                     id="rounding: 4 -> 1 keeps the new revision (2 * 1/4 = 0.5 rounds to 1)"),
        pytest.param(8, 2, 2, 2, 1, [("v1", 1, OLD_TIME)], {"new": 7, "v1": 3},
                     id="rounding: 2 -> 8 with surge 2 (1 * 10/4 = 2.5 rounds to 3)"),
    ],
)  # fmt: skip
def test_proportional_step_mirrors_test_scale(
    replicas: int, max_surge: int, before: int, before_surge: int, new: int,
    old: list[tuple[str, int, int]], expected: dict[str, int],
) -> None:  # fmt: skip
    # As in TestScale, every revision carries the old spec's desired and max replicas and
    # none is available (so the new one is never saturated).
    sized = before + before_surge
    new_revision = revision("new", 3, not_ready=new, desired=before, max_replicas=sized)
    olds = [revision(name, created, not_ready=size, desired=before, max_replicas=sized) for name, size, created in old]
    state = fleet(replicas, new_revision, *olds, max_surge=max_surge)
    assert sizes_after(state, proportional_step(state, before)) == expected


def test_proportional_step_saturated_but_broken_new_revision_leaves_old_alone() -> None:
    """TestScale "saturated but broken new replica set does not affect old pods"."""
    state = fleet(2, revision("new", 3, not_ready=2, desired=2, max_replicas=3),
                  revision("v1", 2, not_ready=1, desired=2, max_replicas=3), max_surge=1, max_unavailable=1)  # fmt: skip
    assert sizes_after(state, proportional_step(state, 3)) == {"new": 2, "v1": 1}


def test_proportional_step_saturated_new_revision_scales_old_to_zero() -> None:
    """IsSaturated: the new revision has all replicas, sized for them and available."""
    state = fleet(5, revision("new", 3, available=5, desired=5, max_replicas=6),
                  revision("v2", 2, available=2, desired=4), revision("v1", 1, available=1, desired=4),
                  max_surge=1, max_unavailable=0)  # fmt: skip
    assert proportional_step(state, 8).sizes == {"v2": 0, "v1": 0}


def test_proportional_step_only_active_revision_takes_all_replicas() -> None:
    state = fleet(7, revision("new", 3), revision("v1", 1, available=4, desired=4, max_replicas=5), max_surge=1)
    assert sizes_after(state, proportional_step(state, 4)) == {"new": 0, "v1": 7}


def test_proportional_step_falls_back_to_status_replicas_without_annotation() -> None:
    # No max-replicas annotation: the fleet's status.replicas (5) stands in. 2 * 10/5 and 3 * 10/5.
    state = fleet(10, revision("new", 3, not_ready=2, desired=5), revision("v1", 1, not_ready=3, desired=5))
    assert sizes_after(state, proportional_step(state, 5)) == {"new": 4, "v1": 6}


# -- DeploymentComplete and cleanupDeployment (sync_test.go) ---------------------------------


def test_is_complete() -> None:
    assert is_complete(fleet(3, revision("new", 2, available=3), revision("old", 1)), 3)
    assert not is_complete(fleet(3, revision("new", 2, available=3), revision("old", 1)), 4)  # one still terminating
    assert not is_complete(fleet(3, revision("new", 2, available=2, not_ready=1)), 3)
    assert not is_complete(fleet(3, revision("new", 2, available=2), revision("old", 1, available=1)), 3)
    assert not is_complete(fleet(3, revision("new", 2, available=1, warming=2), min_ready_s=10), 3)
    assert is_complete(fleet(0, revision("new", 2)), 0)


def _history(*numbers: int) -> tuple[Revision, ...]:
    return tuple(revision(f"r{n}", n) for n in numbers)


@pytest.mark.parametrize(
    ("numbers", "with_clusters", "limit", "expected"),
    [
        # TestDeploymentController_cleanupDeployment
        ((1, 2, 3), set(), 1, ["r1", "r2"]),
        ((1, 2, 3, 4), {"r2", "r3", "r4"}, 0, ["r1"]),  # only revisions without a cluster go
        ((1, 2), set(), 0, ["r1", "r2"]),
        ((1, 2), {"r1", "r2"}, 0, []),
        ((1, 2, 3), set(), 2**31 - 1, []),
        # TestDeploymentController_cleanupDeploymentOrder: by revision number, not by age
        ((2, 1), set(), 1, ["r1"]),
        ((1, 2, 3), {"r1"}, 1, ["r2"]),
        ((1, 2, 3), {"r1", "r2"}, 1, []),
        ((1, 2, 3), {"r3"}, 1, ["r1", "r2"]),  # the limit counts every old revision, as upstream
        ((3, 1, 4, 2), set(), 2, ["r1", "r2"]),
    ],
)
def test_history_to_prune(numbers: tuple[int, ...], with_clusters: set[str], limit: int, expected: list[str]) -> None:
    assert [r.hash for r in history_to_prune(_history(*numbers), limit, with_clusters)] == expected


# -- The simulation: one reconcile step per tick against a fake KubeRay ------------------------


@dataclass
class World:
    """A fleet's clusters as the API server holds them, and a fake KubeRay.

    Each tick the controller takes the step the maths returns (new clusters start not ready,
    victims chosen by ``fleet.clusters.victims`` vanish at once), then KubeRay readies some
    starting clusters (each at the latest ``max_delay`` ticks after its creation; never for a
    ``crashing`` template) and may break a ready one, which the controller deletes: it just
    disappears from its revision.
    """

    replicas: int
    max_surge: int | str
    max_unavailable: int | str
    min_ready_s: int
    new: str
    revisions: dict[str, Revision]
    rng: random.Random
    ready_prob: float = 1.0
    max_delay: int = 0
    crashing: frozenset[str] = frozenset()
    now: float = 0.0
    created: int = 0

    @classmethod
    def steady(
        cls, replicas: int, max_surge: int | str, max_unavailable: int | str, min_ready_s: int, seed: int = 0,
        ready_prob: float = 1.0, max_delay: int = 0, crashing: frozenset[str] = frozenset(),
    ) -> World:  # fmt: skip
        """``replicas`` available clusters of revision "a", and "b" just applied (no cluster yet)."""
        world = cls(replicas, max_surge, max_unavailable, min_ready_s, "b", {}, random.Random(seed), ready_prob,
                    max_delay, crashing)  # fmt: skip
        ready = tuple(cluster(f"a-{i}", "a", -1000.0, -1000.0) for i in range(replicas))
        world.revisions["a"] = Revision("a", 1, -1000.0, ready, replicas, replicas + world.fenceposts[0])
        world.apply_template("b")
        return world

    @property
    def fenceposts(self) -> tuple[int, int]:
        return resolve_fenceposts(self.max_surge, self.max_unavailable, self.replicas)

    def apply_template(self, name: str) -> None:
        """The user applies a template: a new one gets the next number, an old one (a rollback)
        becomes the new revision again."""
        if name not in self.revisions:
            number = max((r.number for r in self.revisions.values()), default=0) + 1
            self.revisions[name] = Revision(name, number, self.now)
        self.new = name

    def state(self) -> FleetState:
        surge, unavailable = self.fenceposts
        old = tuple(r for name, r in self.revisions.items() if name != self.new)
        return FleetState(replicas=self.replicas, strategy="RollingUpdate", max_surge=surge, max_unavailable=unavailable,
                          min_ready_s=self.min_ready_s, new=self.revisions[self.new], old=old, now=self.now)  # fmt: skip

    def sizes(self) -> dict[str, int]:
        return {name: r.size for name, r in self.revisions.items()}

    def reconcile(self) -> Step:
        """One controller pass: a scaling event is sized in proportion, anything else rolls."""
        state = self.state()
        step = proportional_step(state, state.total()) if is_scaling_event(state) else rolling_step(state)
        for name, size in step.sizes.items():
            revision = self.revisions[name]
            members = list(revision.clusters)
            for _ in range(size - revision.size):
                self.created += 1
                members.append(cluster(f"{name}-new-{self.created}", name, self.now, None))
            for victim in victims(members, revision.size - size, self.min_ready_s, self.now):
                members.remove(victim)
            self.revisions[name] = replace(revision, clusters=tuple(members), desired=self.replicas,
                                           max_replicas=self.replicas + state.max_surge)  # fmt: skip
        return step

    def kuberay(self, may_break: bool) -> bool:
        """A second passes; returns whether a ready cluster broke (and was deleted)."""
        self.now += 1
        for name, revision in self.revisions.items():
            members = tuple(
                replace(c, provisioned=True, ready=True, ready_since=self.now) if self._readies(c) else c
                for c in revision.clusters
            )
            self.revisions[name] = replace(revision, clusters=members)
        ready = [c for r in self.revisions.values() for c in r.clusters if c.ready]
        if not (may_break and ready and self.rng.random() < 0.1):
            return False
        broken = self.rng.choice(ready)
        revision = self.revisions[broken.revision]
        self.revisions[broken.revision] = replace(revision, clusters=tuple(c for c in revision.clusters if c != broken))
        return True

    def _readies(self, cluster: ClusterView) -> bool:
        if cluster.ready or cluster.revision in self.crashing:
            return False
        return self.now - cluster.created >= self.max_delay or self.rng.random() < self.ready_prob

    def complete(self) -> bool:
        state = self.state()
        return is_complete(state, state.total())


FENCEPOST = st.one_of(st.integers(0, 5), st.sampled_from(["0%", "10%", "25%", "33%", "50%", "100%"]))


@settings(max_examples=300, deadline=None)
@given(
    replicas=st.integers(0, 20), max_surge=FENCEPOST, max_unavailable=FENCEPOST, min_ready_s=st.integers(0, 3),
    ready_prob=st.floats(0.2, 1.0), max_delay=st.integers(0, 5), breaks=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
    rollover_at=st.none() | st.integers(0, 12),
)  # fmt: skip
def test_rolling_update_keeps_its_bounds_and_finishes(
    replicas: int, max_surge: int | str, max_unavailable: int | str, min_ready_s: int, ready_prob: float,
    max_delay: int, breaks: int, seed: int, rollover_at: int | None,
) -> None:  # fmt: skip
    """From a steady state of ``replicas`` available clusters: never more than replicas +
    maxSurge clusters, never fewer than replicas - maxUnavailable available (until something
    breaks), old revisions only shrink, and the rollout ends with every cluster new and
    available. ``rollover_at``: a third template arrives mid-rollout (Deployment's roll-over)."""
    world = World.steady(replicas, max_surge, max_unavailable, min_ready_s, seed, ready_prob=ready_prob, max_delay=max_delay)
    surge, unavailable = world.fenceposts
    ticks = (rollover_at or 0) + 2 * (replicas + breaks + 2) * (max_delay + min_ready_s + 3)
    broke, breaks_left, sizes = False, breaks, world.sizes()
    for tick in range(ticks):
        if tick == rollover_at:
            world.apply_template("c")
        if world.complete() and (rollover_at is None or tick > rollover_at):
            break
        world.reconcile()
        state = world.state()
        assert state.total() <= replicas + surge, f"tick {tick}: {world.sizes()}"
        assert broke or state.available() >= replicas - unavailable, f"tick {tick}: {world.sizes()}"
        if world.kuberay(may_break=breaks_left > 0):
            broke, breaks_left = True, breaks_left - 1
        for name, size in world.sizes().items():
            assert name == world.new or size <= sizes.get(name, 0), f"tick {tick}: old revision {name} grew"
        sizes = world.sizes()
    else:
        pytest.fail(f"not complete after {ticks} ticks: {world.sizes()}")
    assert world.sizes()[world.new] == replicas
    assert sum(world.sizes().values()) == replicas
    assert not world.reconcile(), "a complete rollout takes no further step"


@settings(max_examples=200, deadline=None)
@given(
    replicas=st.integers(0, 20), rescaled=st.integers(0, 20), max_surge=FENCEPOST, max_unavailable=FENCEPOST,
    min_ready_s=st.integers(0, 3), max_delay=st.integers(0, 4), rescale_at=st.integers(0, 10), seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_scaling_during_a_rollout_finishes_at_the_new_size(
    replicas: int, rescaled: int, max_surge: int | str, max_unavailable: int | str, min_ready_s: int,
    max_delay: int, rescale_at: int, seed: int,
) -> None:  # fmt: skip
    """``spec.replicas`` changes mid-rollout (an autoscaler): proportional scaling, then the
    rollout goes on and ends with ``rescaled`` new, available clusters."""
    world = World.steady(replicas, max_surge, max_unavailable, min_ready_s, seed, ready_prob=0.5, max_delay=max_delay)
    ticks = rescale_at + 2 * (max(replicas, rescaled) + 2) * (max_delay + min_ready_s + 3)
    for tick in range(ticks):
        if tick == rescale_at:
            world.replicas = rescaled
        if world.complete() and tick > rescale_at:
            break
        world.reconcile()
        state = world.state()
        if tick >= rescale_at:
            assert state.total() <= rescaled + world.fenceposts[0], f"tick {tick}: {world.sizes()}"
        world.kuberay(may_break=False)
    else:
        pytest.fail(f"not complete after {ticks} ticks: {world.sizes()}")
    assert world.sizes()[world.new] == rescaled == sum(world.sizes().values())


def _sync_status(world: World, status: FleetStatus, deadline_s: int) -> FleetStatus:
    """The status the controller writes after a step (``syncRolloutStatus``)."""
    state = world.state()
    counts = fleet_counts(state)
    conditions = availability(status.conditions, counts, world.replicas, world.fenceposts[1], world.now)
    conditions = rollout_conditions(status, conditions, counts, world.complete(), world.new, deadline_s, world.now)
    return FleetStatus(replicas=counts.replicas, updatedReplicas=counts.updated, readyReplicas=counts.ready,
                       availableReplicas=counts.available, unavailableReplicas=counts.unavailable, conditions=conditions)  # fmt: skip


def _condition(status: FleetStatus, kind: str) -> tuple[str, str]:
    condition = status.condition(kind)
    assert condition is not None
    return condition.status, condition.reason


def test_crash_looping_revision_stalls_above_the_floor_then_rollback_completes() -> None:
    """10 replicas, maxSurge 3, maxUnavailable 2, and a new template whose clusters never get
    ready: the rollout goes to 8 old + 5 new and stays there (13 clusters, 8 available), times
    out, and rolling back to the old template replaces the 5 broken ones with 2 old ones."""
    world = World.steady(10, 3, 2, min_ready_s=5, crashing=frozenset({"b"}))
    created = Condition(type=PROGRESSING, status="True", reason=NEW_REVISION_CREATED)
    status = FleetStatus(replicas=10, readyReplicas=10, availableReplicas=10, conditions=set_condition([], created, 0.0))
    for tick in range(40):
        world.reconcile()
        state = world.state()
        assert state.total() <= 13 and state.available() >= 8, f"tick {tick}: {world.sizes()}"
        status = _sync_status(world, status, deadline_s=10)
        world.kuberay(may_break=False)
    assert world.sizes() == {"a": 8, "b": 5}
    assert not rolling_step(world.state()), "stalled: no step can keep the floor"
    assert _condition(status, PROGRESSING) == ("False", TIMED_OUT)
    assert _condition(status, AVAILABLE) == ("True", "MinimumReplicasAvailable")

    world.apply_template("a")  # rollback: the old template is the new revision again
    for tick in range(20):
        if world.complete():
            break
        world.reconcile()
        state = world.state()
        assert state.total() <= 13 and state.available() >= 8, f"rollback tick {tick}: {world.sizes()}"
        status = _sync_status(world, status, deadline_s=10)
        world.kuberay(may_break=False)
    else:
        pytest.fail(f"rollback not complete: {world.sizes()}")
    assert world.sizes() == {"a": 10, "b": 0}
    status = _sync_status(world, status, deadline_s=10)
    assert _condition(status, PROGRESSING) == ("True", NEW_REVISION_AVAILABLE)
