"""Smoke tests of the test control plane (``tests/kube_env.py``) against the real v1.20.2 server:
the API behaviours the fleet controller and the autoscaler rely on work there as in a cluster."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.kube_env import CEL_KEY, KubeTestEnv
from tests.polling import eventually

pytestmark = pytest.mark.k8s

# KubeRay's CRDs sit next to the repository (``../shared``); checks that need them are skipped on a
# clone without them.
RAYCLUSTER_CRD = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuberay" / "ray.io_rayclusters.yaml"
RAY = ("ray.io", "v1")


@pytest.fixture
def api(kube: KubeTestEnv) -> Iterator[client.ApiClient]:
    with kube.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def raycluster_crd(kube: KubeTestEnv) -> None:
    if not RAYCLUSTER_CRD.is_file():
        pytest.skip(f"{RAYCLUSTER_CRD} is absent (the shared KubeRay CRDs)")
    kube.load_crd(RAYCLUSTER_CRD)


def raycluster(name: str) -> dict:
    """A minimal RayCluster; ``rayVersion: ""`` exercises the empty-string patch of the build."""
    head = {
        "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {"rayVersion": "", "headGroupSpec": head},
    }


def gone(read: Callable[..., object], *args: str) -> bool:
    """Whether ``read(*args)`` answers 404."""
    try:
        read(*args)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_namespace_is_created_and_deleted_by_the_namespace_controller(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = f"rf-ns-{secrets.token_hex(4)}"
    created = core.create_namespace({"metadata": {"name": name}})
    assert created.status.phase == "Active"
    core.delete_namespace(name)
    # Deletion only marks it Terminating; kube-controller-manager's namespace controller finishes it.
    eventually(lambda: gone(core.read_namespace, name), f"namespace {name} to disappear", 60)


def test_owned_objects_are_garbage_collected(api: client.ApiClient, kube_namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(kube_namespace, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "controller": True,
    }
    core.create_namespaced_config_map(kube_namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}})
    core.delete_namespaced_config_map("owner", kube_namespace, propagation_policy="Background")
    eventually(lambda: gone(core.read_namespaced_config_map, "child", kube_namespace), "the child to be collected", 60)


def test_raycluster_crd_is_established_without_cel(
    kube: KubeTestEnv, raycluster_crd: None, api: client.ApiClient
) -> None:
    kube.load_crd(RAYCLUSTER_CRD)  # a second load replaces the first
    raw = client.ApiextensionsV1Api(api).read_custom_resource_definition("rayclusters.ray.io", _preload_content=False)
    stored = json.loads(raw.data)
    assert CEL_KEY not in raw.data.decode()
    assert {"type": "Established", "status": "True"}.items() <= next(
        c for c in stored["status"]["conditions"] if c["type"] == "Established"
    ).items()


def test_raycluster_status_is_written_like_kuberay_does(
    raycluster_crd: None, api: client.ApiClient, kube_namespace: str
) -> None:
    objects = client.CustomObjectsApi(api)
    created = objects.create_namespaced_custom_object(*RAY, kube_namespace, "rayclusters", raycluster("rc"))
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    status = {"state": "ready", "readyWorkerReplicas": 0, "conditions": [
        {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    objects.patch_namespaced_custom_object_status(*RAY, kube_namespace, "rayclusters", "rc", {"status": status})
    read = objects.get_namespaced_custom_object(*RAY, kube_namespace, "rayclusters", "rc")
    assert read["status"] == status
    assert read["metadata"]["generation"] == 1  # a /status write is not a spec change


def test_watch_resumed_from_a_resource_version_sees_the_update(
    raycluster_crd: None, api: client.ApiClient, kube_namespace: str
) -> None:
    objects = client.CustomObjectsApi(api)
    listed = objects.list_namespaced_custom_object(*RAY, kube_namespace, "rayclusters")
    objects.create_namespaced_custom_object(*RAY, kube_namespace, "rayclusters", raycluster("rc"))
    added = next_event(objects, kube_namespace, listed["metadata"]["resourceVersion"])
    assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "rc")
    # The update happens while nobody watches; resuming from the last version seen must deliver it.
    objects.patch_namespaced_custom_object_status(
        *RAY, kube_namespace, "rayclusters", "rc", {"status": {"state": "ready"}}
    )
    modified = next_event(objects, kube_namespace, added["object"]["metadata"]["resourceVersion"])
    assert modified["type"] == "MODIFIED"
    assert modified["object"]["status"]["state"] == "ready"
    assert modified["object"]["metadata"]["resourceVersion"] != added["object"]["metadata"]["resourceVersion"]


def next_event(objects: client.CustomObjectsApi, namespace: str, resource_version: str) -> dict:
    """The first RayCluster event after ``resource_version``."""
    watcher = watch.Watch()
    for event in watcher.stream(objects.list_namespaced_custom_object, *RAY, namespace, "rayclusters",
                                resource_version=resource_version, timeout_seconds=60):  # fmt: skip
        watcher.stop()
        return event
    raise AssertionError(f"no event after resourceVersion {resource_version} within the watch's 60 s")


def test_deployment_scale_subresource_changes_replicas(api: client.ApiClient, kube_namespace: str) -> None:
    apps = client.AppsV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(kube_namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}})  # fmt: skip
    scale = apps.patch_namespaced_deployment_scale("web", kube_namespace, {"spec": {"replicas": 3}})
    assert scale.spec.replicas == 3
    deployment = apps.read_namespaced_deployment("web", kube_namespace)
    assert deployment.spec.replicas == 3
    assert deployment.metadata.generation == 2
    assert apps.read_namespaced_deployment_scale("web", kube_namespace).spec.replicas == 3
