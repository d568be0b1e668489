"""Revisions and clusters: the template hash, the RayClusters stamped from a revision, and how
one RayCluster is judged from its KubeRay status (ready, broken, available) and chosen for
deletion."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from fleet.api import (
    ANNOTATION_DESIRED_REPLICAS,
    ANNOTATION_MAX_REPLICAS,
    API_VERSION,
    KIND,
    LABEL_FLEET,
    LABEL_REVISION_HASH,
)
from fleet.clusters import DELETION_COST, ClusterView, parse_time, victims, view_cluster
from fleet.progress import timestamp
from fleet.revisions import (
    SAFE_ALPHABET,
    controller_revision,
    ray_cluster,
    scaling_target_selector,
    template_hash,
)

T0 = 1_700_000_000.0


def template() -> dict:
    """A fleet's cluster template: labels and annotations, a head and two worker groups."""
    return {
        "metadata": {"labels": {"app": "llm"}, "annotations": {"team": "serving"}},
        "spec": {
            "rayVersion": "2.40.0",
            "headGroupSpec": {"rayStartParams": {}, "template": {"metadata": {"labels": {"role": "head"}},
                                                                 "spec": {"containers": [{"name": "head", "image": "vllm:1"}]}}},
            "workerGroupSpecs": [
                {"groupName": "gpu", "replicas": 1, "template": {"spec": {"containers": [{"name": "w", "image": "vllm:1"}]}}},
                {"groupName": "cpu", "replicas": 2},
            ],
        },
    }  # fmt: skip


def fleet_object(spec_template: dict | None = None) -> dict:
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": "llama", "namespace": "serving", "uid": "uid-1"},
        "spec": {"replicas": 3, "template": template() if spec_template is None else spec_template},
    }  # fmt: skip


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


# -- template_hash ------------------------------------------------------------------------------


def test_template_hash_is_stable_under_key_order() -> None:
    assert template_hash(_reversed_keys(template())) == template_hash(template())


def test_template_hash_ignores_controller_labels_at_every_level() -> None:
    labelled = template()
    ours = {LABEL_FLEET: "llama", LABEL_REVISION_HASH: "abc"}
    labelled["metadata"]["labels"].update(ours)
    labelled["spec"]["headGroupSpec"]["template"]["metadata"]["labels"].update(ours)
    labelled["spec"]["workerGroupSpecs"][0]["template"]["metadata"] = {"labels": dict(ours)}
    labelled["spec"]["workerGroupSpecs"][1]["template"] = {"metadata": {"labels": dict(ours)}}
    assert template_hash(labelled) == template_hash(template())


def test_template_hash_does_not_change_its_input() -> None:
    labelled = template()
    labelled["metadata"]["labels"][LABEL_FLEET] = "llama"
    kept = copy.deepcopy(labelled)
    template_hash(labelled)
    assert labelled == kept


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(image="vllm:2"),
        lambda t: t["metadata"]["labels"].update(app="other"),
        lambda t: t["spec"]["workerGroupSpecs"][0].update(replicas=2),
        lambda t: t["spec"]["headGroupSpec"]["template"]["metadata"]["labels"].update({"rayfleet.io/model": "x"}),
    ],
    ids=["image", "cluster label", "worker replicas", "pod label"],
)
def test_template_hash_changes_with_the_template(change: Callable[[dict], object]) -> None:
    changed = template()
    change(changed)
    assert template_hash(changed) != template_hash(template())


def test_template_hash_changes_with_collision_count_and_uses_the_safe_alphabet() -> None:
    hashes = [template_hash(template(), n) for n in range(4)]
    assert len(set(hashes)) == 4
    for value in hashes + [template_hash({"spec": {}}), template_hash({})]:
        assert value and set(value) <= set(SAFE_ALPHABET), value


# -- ray_cluster, the revision record ---------------------------------------------------------------


def test_ray_cluster_labels_cluster_and_every_pod_template() -> None:
    fleet = fleet_object()
    kept = copy.deepcopy(fleet)
    cluster = ray_cluster(fleet, "5d7b9")
    ours = {LABEL_FLEET: "llama", LABEL_REVISION_HASH: "5d7b9"}
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    metadata = cluster["metadata"]
    assert metadata["generateName"] == "llama-5d7b9-"
    assert "name" not in metadata
    assert metadata["namespace"] == "serving"
    assert metadata["labels"] == {"app": "llm", **ours}
    assert metadata["annotations"] == {"team": "serving"}
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["template"]["metadata"]["labels"] == {"role": "head", **ours}
    assert [g["template"]["metadata"]["labels"] for g in spec["workerGroupSpecs"]] == [ours, ours]
    assert spec["workerGroupSpecs"][0]["template"]["spec"] == template()["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert fleet == kept, "the fleet's template must not be changed"


def test_ray_cluster_is_owned_by_the_fleet() -> None:
    [owner] = ray_cluster(fleet_object(), "5d7b9")["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": API_VERSION, "kind": KIND, "name": "llama", "uid": "uid-1", "controller": True,
                     "blockOwnerDeletion": True}  # fmt: skip


def test_ray_cluster_hashes_like_its_template() -> None:
    """A cluster read back as a template (our labels ignored) names the same revision."""
    cluster = ray_cluster(fleet_object(), "5d7b9")
    read_back = {"metadata": {k: cluster["metadata"][k] for k in ("labels", "annotations")}, "spec": cluster["spec"]}
    assert template_hash(read_back) == template_hash(template())


def test_controller_revision_records_the_clean_template() -> None:
    labelled = template()
    labelled["metadata"]["labels"][LABEL_REVISION_HASH] = "stale"
    record = controller_revision(fleet_object(labelled), "5d7b9", 4, (3, 4))
    assert record["metadata"]["name"] == "llama-5d7b9"
    assert record["metadata"]["labels"] == {LABEL_FLEET: "llama", LABEL_REVISION_HASH: "5d7b9"}
    assert record["metadata"]["annotations"] == {ANNOTATION_DESIRED_REPLICAS: "3", ANNOTATION_MAX_REPLICAS: "4"}
    assert record["revision"] == 4
    assert record["data"]["metadata"]["labels"] == {"app": "llm"}


def test_scaling_target_selector_picks_head_pods() -> None:
    assert scaling_target_selector("llama") == f"{LABEL_FLEET}=llama,ray.io/node-type=head"


# -- view_cluster ------------------------------------------------------------------------------------


def ray_cluster_object(
    provisioned: str | None = "True", head_ready: str | None = "True", ready_workers: int = 2, desired_workers: int = 2,
    provisioned_at: float = T0 - 100, head_ready_at: float = T0 - 50, deleting: bool = False,
    annotations: dict | None = None,
) -> dict:  # fmt: skip
    conditions = []
    if provisioned is not None:
        conditions.append({"type": "RayClusterProvisioned", "status": provisioned, "lastTransitionTime": timestamp(provisioned_at)})
    if head_ready is not None:
        conditions.append({"type": "HeadPodReady", "status": head_ready, "lastTransitionTime": timestamp(head_ready_at)})
    metadata = {
        "name": "llama-5d7b9-x2x4q", "creationTimestamp": timestamp(T0 - 200), "annotations": annotations or {},
        "labels": {LABEL_FLEET: "llama", LABEL_REVISION_HASH: "5d7b9"},
    }  # fmt: skip
    if deleting:
        metadata["deletionTimestamp"] = timestamp(T0)
    status = {"conditions": conditions, "readyWorkerReplicas": ready_workers, "desiredWorkerReplicas": desired_workers}
    return {"metadata": metadata, "status": status}


def test_view_cluster_ready() -> None:
    view = view_cluster(ray_cluster_object())
    assert (view.name, view.revision, view.created) == ("llama-5d7b9-x2x4q", "5d7b9", T0 - 200)
    assert view.ready and view.provisioned and not view.broken and not view.deleting
    assert view.ready_since == T0 - 50


@pytest.mark.parametrize(
    ("kwargs", "broken"),
    [
        ({"provisioned": None, "head_ready": None, "ready_workers": 0}, False),  # just created
        ({"provisioned": "False", "head_ready": "True"}, False),  # still provisioning
        ({"provisioned": "True", "head_ready": "False"}, True),  # the head died after provisioning
        ({"provisioned": "True", "head_ready": None}, True),
        ({"provisioned": "True", "ready_workers": 1}, True),  # a tensor-parallel worker died
        ({"provisioned": "True", "head_ready": "False", "deleting": True}, False),  # already going
    ],
)
def test_view_cluster_not_ready(kwargs: dict, broken: bool) -> None:
    view = view_cluster(ray_cluster_object(**kwargs))
    assert not view.ready and view.ready_since is None
    assert view.broken is broken
    assert not view.available(0, T0)


def test_a_broken_cluster_is_dated_by_its_heads_condition() -> None:
    """The controller replaces a broken cluster only after a grace measured from this."""
    assert view_cluster(ray_cluster_object(head_ready="False", head_ready_at=T0 - 7)).broken_since == T0 - 7
    assert view_cluster(ray_cluster_object()).broken_since is None  # a ready cluster is not broken at all
    missing_worker = ray_cluster_object(ready_workers=1)
    assert view_cluster(missing_worker).broken_since is None  # no date known: replaced without a grace
    missing_worker["status"]["lastUpdateTime"] = timestamp(T0 - 3)
    assert view_cluster(missing_worker).broken_since == T0 - 3


def test_view_cluster_without_status() -> None:
    view = view_cluster({"metadata": {"name": "x"}})
    assert (view.ready, view.provisioned, view.broken, view.revision, view.created) == (False, False, False, "", 0.0)


def test_more_ready_workers_than_desired_is_ready() -> None:
    assert view_cluster(ray_cluster_object(ready_workers=3, desired_workers=2)).ready


@pytest.mark.parametrize(("provisioned_at", "head_ready_at"), [(T0 - 100, T0 - 50), (T0 - 50, T0 - 100)])
def test_available_after_min_ready_seconds_from_the_later_condition(provisioned_at: float, head_ready_at: float) -> None:
    view = view_cluster(ray_cluster_object(provisioned_at=provisioned_at, head_ready_at=head_ready_at))
    assert view.ready_since == T0 - 50
    assert view.available(0, T0 - 50)
    assert view.available(30, T0)
    assert not view.available(60, T0)
    assert view.available(60, T0 + 11)
    assert view.available_at(60) == T0 + 10


def test_deletion_cost() -> None:
    assert view_cluster(ray_cluster_object(annotations={DELETION_COST: "-5"})).deletion_cost == -5
    assert view_cluster(ray_cluster_object(annotations={DELETION_COST: "lots"})).deletion_cost == 0


def test_parse_time() -> None:
    assert parse_time(timestamp(T0)) == T0
    assert parse_time(None) is None and parse_time("") is None


# -- victims ------------------------------------------------------------------------------------------


def view(name: str, ready: bool = True, since: float | None = T0 - 1000, cost: int = 0, created: float = T0 - 2000) -> ClusterView:
    return ClusterView(name=name, revision="r", created=created, deleting=False, provisioned=ready, ready=ready,
                       ready_since=since if ready else None, deletion_cost=cost)  # fmt: skip


def test_victims_cheapest_loss_first() -> None:
    clusters = [
        view("available-old"),
        view("available-recent", since=T0 - 500),
        view("costly-recent", since=T0 - 100, cost=10),
        view("cheap", since=T0 - 2000, cost=-10),
        view("warming", since=T0 - 5),
        view("starting-b", ready=False),
        view("starting-a", ready=False),
    ]
    order = [c.name for c in victims(clusters, len(clusters), 60, T0)]
    assert order == ["starting-a", "starting-b", "warming", "cheap", "available-recent", "available-old", "costly-recent"]


@pytest.mark.parametrize(("count", "expected"), [(0, 0), (-2, 0), (2, 2), (9, 3)])
def test_victims_count(count: int, expected: int) -> None:
    assert len(victims([view("a"), view("b"), view("c")], count, 0, T0)) == expected
