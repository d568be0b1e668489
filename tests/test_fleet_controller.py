"""The RayClusterFleet controller against the real kube-apiserver, with a test-side KubeRay.

Every bound is checked on what a watcher of the API server saw, event by event; nothing is
timed. Controllers run in this process (fast) or as processes (to kill one, or run two).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest
from kubernetes import client

from fleet.api import ANNOTATION_REVISION, GROUP, LABEL_REVISION_HASH, PLURAL, RAY_GROUP, RAY_PLURAL, RAY_VERSION, VERSION
from tests.fleet_harness import (
    REPO,
    FakeKubeRay,
    Fleets,
    WatchObserver,
    controller_command,
    controller_in_process,
    fleet_body,
    with_version,
)
from tests.kube_env import KubeTestEnv
from tests.polling import eventually

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]


@pytest.fixture
def world(kube: KubeTestEnv, kube_namespace: str, fleet_crd_installed: KubeTestEnv,
          raycluster_crd_installed: KubeTestEnv) -> Iterator[tuple]:  # fmt: skip
    with kube.api_client() as api_client, FakeKubeRay(api_client, kube_namespace) as kuberay:
        yield api_client, kube_namespace, Fleets(api_client, kube_namespace), kuberay


def revision_hashes(fleets: Fleets) -> set[str]:
    return {c["metadata"]["labels"][LABEL_REVISION_HASH] for c in fleets.clusters()}


def test_rolling_update_never_drops_below_capacity_or_surges_past_it_and_keeps_the_history_limit(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleet = fleets.create(fleet_body("llama", replicas=4, max_surge=1, max_unavailable=0, revisionHistoryLimit=1))
        eventually(lambda: fleets.settled("llama", 4), "4 available clusters", 60)
        first = revision_hashes(fleets)
        with WatchObserver(api_client, namespace) as observer:
            for version in ("v2", "v3"):
                fleets.patch("llama", with_version(fleet, version))
                eventually(lambda: fleets.settled("llama", 4) and len(revision_hashes(fleets)) == 1, f"rollout to {version}", 90)
        assert revision_hashes(fleets) != first
        assert max(o.total for o in observer.seen) <= 5, "more than replicas + maxSurge clusters existed"
        assert min(o.available for o in observer.seen) >= 4, "fewer than replicas - maxUnavailable were available"
        assert any(len(o.revisions) == 2 for o in observer.seen)  # it did roll, one cluster at a time
        assert len(fleets.revisions("llama")) == 2  # the current one and revisionHistoryLimit=1 old one
        assert fleets.get("llama")["metadata"]["annotations"][ANNOTATION_REVISION] == "3"
        assert fleets.condition("llama", "Progressing")["reason"] == "NewReplicaSetAvailable"
        assert fleets.condition("llama", "Available")["status"] == "True"


def test_reapplying_an_old_template_rolls_back_to_its_revision(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleet = fleets.create(fleet_body("back", replicas=2, max_surge=1, max_unavailable=0))
        eventually(lambda: fleets.settled("back", 2), "2 available clusters", 60)
        original = revision_hashes(fleets)
        fleets.patch("back", with_version(fleet, "v2"))
        eventually(lambda: fleets.settled("back", 2) and revision_hashes(fleets) != original, "rollout to v2", 60)
        fleets.patch("back", with_version(fleet, "v1"))
        eventually(lambda: fleets.settled("back", 2) and revision_hashes(fleets) == original, "rollback to v1", 60)
        assert fleets.get("back")["metadata"]["annotations"][ANNOTATION_REVISION] == "3"
        numbers = {r.metadata.labels[LABEL_REVISION_HASH]: r.revision for r in fleets.revisions("back")}
        assert numbers[original.pop()] == 3  # the old record, renumbered: no duplicate history


def test_scale_subresource_scales_the_fleet_as_an_autoscaler_would(world: tuple) -> None:
    import asyncio

    from autoscaling.spec import ScaleTargetRef
    from autoscaling.targets import KubernetesScaleTarget

    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleets.create(fleet_body("scaled", replicas=1))
        eventually(lambda: fleets.settled("scaled", 1), "1 available cluster", 60)
        custom = client.CustomObjectsApi(api_client)
        custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "scaled", {"spec": {"replicas": 3}})
        eventually(lambda: fleets.settled("scaled", 3), "3 available clusters", 60)
        ref = ScaleTargetRef(apiVersion=f"{GROUP}/{VERSION}", kind="RayClusterFleet", name="scaled", namespace=namespace)
        target = KubernetesScaleTarget(ref, api_client)
        assert asyncio.run(target.get_scale()).replicas == 3
        asyncio.run(target.set_scale(2))
        eventually(lambda: fleets.settled("scaled", 2), "2 available clusters", 60)
        scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "scaled")
        assert scale["status"]["selector"] == "rayfleet.io/fleet=scaled,ray.io/node-type=head"


def test_a_cluster_that_breaks_is_deleted_and_replaced(world: tuple) -> None:
    api_client, namespace, fleets, kuberay = world
    with controller_in_process(api_client, namespace):
        fleets.create(fleet_body("healing", replicas=2))
        eventually(lambda: fleets.settled("healing", 2), "2 available clusters", 60)
        broken = fleets.clusters()[0]
        kuberay.break_cluster(broken)
        names = lambda: {c["metadata"]["name"] for c in fleets.clusters()}  # noqa: E731
        eventually(lambda: broken["metadata"]["name"] not in names() and fleets.settled("healing", 2), "a replacement", 60)
        events = client.CoreV1Api(api_client).list_namespaced_event(namespace).items
        assert any(e.reason == "ReplacingBrokenCluster" and broken["metadata"]["name"] in e.message for e in events)


def test_a_rollout_that_makes_no_progress_reports_the_deadline(world: tuple) -> None:
    api_client, namespace, fleets, kuberay = world
    with controller_in_process(api_client, namespace):
        fleet = fleets.create(fleet_body("stuck", replicas=2, max_surge=1, max_unavailable=0, progressDeadlineSeconds=3))
        eventually(lambda: fleets.settled("stuck", 2), "2 available clusters", 60)
        old = revision_hashes(fleets)
        from fleet.revisions import template_hash

        kuberay.held_revisions.add(template_hash(with_version(fleet, "crashloop")["spec"]["template"]))
        fleets.patch("stuck", with_version(fleet, "crashloop"))
        eventually(lambda: fleets.condition("stuck", "Progressing").get("reason") == "ProgressDeadlineExceeded", "the deadline", 60)
        status = fleets.status("stuck")
        assert status["availableReplicas"] == 2 and status["updatedReplicas"] == 1  # the old clusters kept serving
        assert old <= revision_hashes(fleets)


def test_recreate_removes_every_old_cluster_before_the_first_new_one(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleet = fleets.create(fleet_body("recreated", replicas=3, strategy={"type": "Recreate"}))
        eventually(lambda: fleets.settled("recreated", 3), "3 available clusters", 60)
        original = revision_hashes(fleets)
        with WatchObserver(api_client, namespace) as observer:
            fleets.patch("recreated", with_version(fleet, "v2"))
            eventually(lambda: fleets.settled("recreated", 3) and not (revision_hashes(fleets) & original), "the recreate", 60)
        assert all(len(o.revisions) <= 1 for o in observer.seen), "old and new clusters existed side by side"
        assert any(o.total == 0 for o in observer.seen)  # Recreate: everything went before anything came


def test_a_paused_fleet_scales_but_does_not_roll_until_resumed(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleet = fleets.create(fleet_body("paused", replicas=2))
        eventually(lambda: fleets.settled("paused", 2), "2 available clusters", 60)
        original = revision_hashes(fleets)
        fleets.patch("paused", {"spec": {"paused": True}})
        eventually(lambda: fleets.condition("paused", "Progressing").get("reason") == "DeploymentPaused", "DeploymentPaused", 30)
        fleets.patch("paused", {**with_version(fleet, "v2"), "spec": {**with_version(fleet, "v2")["spec"], "replicas": 3}})
        eventually(lambda: fleets.status("paused").get("availableReplicas") == 3, "the scale-up while paused", 60)
        assert revision_hashes(fleets) == original and len(fleets.revisions("paused")) == 1  # scaled, not rolled
        assert fleets.status("paused")["updatedReplicas"] == 0  # the new template has no cluster yet
        fleets.patch("paused", {"spec": {"paused": False}})
        eventually(lambda: fleets.settled("paused", 3) and not (revision_hashes(fleets) & original), "the resumed rollout", 60)
        assert fleets.condition("paused", "Progressing")["reason"] == "NewReplicaSetAvailable"


def test_deleting_a_fleet_deletes_its_clusters(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    with controller_in_process(api_client, namespace):
        fleets.create(fleet_body("gone", replicas=2))
        eventually(lambda: fleets.settled("gone", 2), "2 available clusters", 60)
        client.CustomObjectsApi(api_client).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")
        # kube-controller-manager's garbage collector follows the clusters' ownerReferences
        eventually(lambda: not fleets.clusters("gone") and not fleets.revisions("gone"), "the clusters to go", 60)


def test_bad_specs_are_reported_and_nothing_else_is_touched(world: tuple) -> None:
    api_client, namespace, fleets, _ = world
    custom = client.CustomObjectsApi(api_client)
    bystander = custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "bystander", "labels": {"app.kubernetes.io/name": "other"}},
        "spec": fleet_body("x")["spec"]["template"]["spec"],
    })  # fmt: skip
    with pytest.raises(client.exceptions.ApiException) as rejected:
        fleets.create(fleet_body("negative", replicas=-1))
    assert rejected.value.status == 422
    with controller_in_process(api_client, namespace):
        body = fleet_body("mismatch")
        body["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "other"}}  # selects the bystander
        fleets.create(body)
        eventually(lambda: fleets.condition("mismatch", "Progressing").get("reason") == "InvalidSpec", "InvalidSpec", 30)
        assert "does not match spec.template.metadata.labels" in fleets.condition("mismatch", "Progressing")["message"]
        fleets.create(fleet_body("neighbour", replicas=1))
        eventually(lambda: fleets.settled("neighbour", 1), "the valid fleet next to it", 60)
    clusters = {c["metadata"]["name"]: c for c in fleets.clusters()}
    after = clusters["bystander"]["metadata"]  # (the fake KubeRay wrote its status; nobody else touched it)
    assert (after["generation"], after["labels"], after.get("ownerReferences")) == (
        bystander["metadata"]["generation"], bystander["metadata"]["labels"], None)
    assert len(clusters) == 2  # the bystander and the valid fleet's one cluster; none for the bad fleet


def test_a_controller_killed_mid_rollout_is_resumed_by_its_restart(world: tuple, kube: KubeTestEnv) -> None:
    api_client, namespace, fleets, kuberay = world
    kuberay.ready_after_s = 1.0  # a rollout of several steps, so the kill lands in the middle
    command = controller_command(kube.kubeconfig_path, namespace, "controller-0", lease_namespace=namespace)
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fleet = fleets.create(fleet_body("resumed", replicas=4, max_surge=1, max_unavailable=0))
        eventually(lambda: fleets.settled("resumed", 4), "4 available clusters", 90)
        original = revision_hashes(fleets)
        with WatchObserver(api_client, namespace) as observer:
            fleets.patch("resumed", with_version(fleet, "v2"))
            eventually(lambda: len(revision_hashes(fleets) - original) >= 1, "the rollout's first new cluster", 60)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            assert not fleets.settled("resumed", 4) or revision_hashes(fleets) != original
            second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                eventually(lambda: fleets.settled("resumed", 4) and not (revision_hashes(fleets) & original), "the resumed rollout", 120)
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(30)
        assert max(o.total for o in observer.seen) <= 5
        assert min(o.available for o in observer.seen) >= 4
    finally:
        if first.poll() is None:
            first.kill()


def test_a_second_controller_stays_passive_until_the_leaders_lease_lapses(world: tuple, kube: KubeTestEnv) -> None:
    api_client, namespace, fleets, _ = world
    coordination = client.CoordinationV1Api(api_client)
    holder = lambda: coordination.read_namespaced_lease("fleet-controller", namespace).spec  # noqa: E731
    leader = subprocess.Popen(controller_command(kube.kubeconfig_path, namespace, "leader", namespace), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    standby = None
    try:
        eventually(lambda: _lease_exists(coordination, namespace) and holder().holder_identity == "leader", "the first leader", 60)
        standby = subprocess.Popen(controller_command(kube.kubeconfig_path, namespace, "standby", namespace), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        fleets.create(fleet_body("led", replicas=1))
        eventually(lambda: fleets.settled("led", 1), "the leader's work", 60)
        assert holder().holder_identity == "leader" and standby.poll() is None  # the standby waits
        leader.send_signal(signal.SIGKILL)  # no release: the standby must wait for the lease to lapse
        leader.wait(30)
        last_renewal = holder().renew_time
        eventually(lambda: holder().holder_identity == "standby", "the standby taking over", 60)
        taken = holder()
        assert (taken.acquire_time - last_renewal).total_seconds() >= taken.lease_duration_seconds - 1
        assert taken.lease_transitions == 1
        fleets.patch("led", {"spec": {"replicas": 2}})
        eventually(lambda: fleets.settled("led", 2), "the new leader's work", 60)
    finally:
        for process in (leader, standby):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


def _lease_exists(coordination: client.CoordinationV1Api, namespace: str) -> bool:
    try:
        coordination.read_namespaced_lease("fleet-controller", namespace)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
