"""``fleet.informer`` against the real v1.20.2 apiserver (``tests/kube_env.py``): list, watch,
resume, 410 relists, selectors and stop, with core kinds and a custom resource."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from fleet.informer import Informer, Resource, new_api_client
from tests.kube_env import KubeTestEnv
from tests.polling import eventually

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

WAIT_S = 30.0
GROUP, VERSION, PLURAL = "informer.rayfleet.io", "v1", "widgets"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}  # fmt: skip


class Recorder:
    """What an informer reported, in order: ``(type, name)`` events and relists' name sets."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.relists: list[set[str]] = []

    def on_event(self, kind: str, obj: dict) -> None:
        self.events.append((kind, obj["metadata"]["name"]))

    def on_relist(self, objects: list[dict]) -> None:
        self.relists.append({obj["metadata"]["name"] for obj in objects})

    def saw(self, *expected: tuple[str, str]) -> bool:
        return all(event in self.events for event in expected)


@pytest.fixture
def api(kube: KubeTestEnv) -> Iterator[client.ApiClient]:
    with new_api_client(str(kube.kubeconfig_path)) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def informers() -> Iterator[list[Informer]]:
    """Informers a test starts; every one is stopped afterwards, and must stop."""
    started: list[Informer] = []
    yield started
    for informer in started:
        assert informer.stop(timeout_s=10), f"informer of {informer.resource.describe()} did not stop"


def follow(informers: list[Informer], api: client.ApiClient, resource: Resource, **options: object) -> tuple[Informer, Recorder]:
    recorder = Recorder()
    informer = Informer(api, resource, recorder.on_event, recorder.on_relist, **options)
    informers.append(informer)
    informer.start()
    assert informer.wait_synced(WAIT_S)
    return informer, recorder


def config_map(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}}, "data": {"v": "0"}}


def pod(name: str, labels: dict[str, str]) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"containers": [{"name": "engine", "image": "sim"}]}}


def test_lists_in_pages_then_reports_each_change(
    api: client.ApiClient, core: client.CoreV1Api, kube_namespace: str, informers: list[Informer]
) -> None:
    for name in ("a", "b", "c"):
        core.create_namespaced_config_map(kube_namespace, config_map(name))
    informer, recorder = follow(informers, api, Resource("", "v1", "configmaps", namespace=kube_namespace), page_size=2)
    assert recorder.relists == [{"a", "b", "c"}]
    assert recorder.events == []  # a first list reports through on_relist only
    listed = informer.get(kube_namespace, "a")
    assert listed is not None and listed["kind"] == "ConfigMap" and listed["apiVersion"] == "v1"

    core.create_namespaced_config_map(kube_namespace, config_map("d"))
    core.patch_namespaced_config_map("a", kube_namespace, {"data": {"v": "1"}})
    core.delete_namespaced_config_map("b", kube_namespace)
    eventually(lambda: recorder.saw(("ADDED", "d"), ("MODIFIED", "a"), ("DELETED", "b")), "the three events", WAIT_S)
    assert recorder.events == [("ADDED", "d"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert informer.get(kube_namespace, "a")["data"] == {"v": "1"}  # the cache was updated before the callback
    assert informer.get(kube_namespace, "b") is None
    assert {"a", "c", "d"} <= {obj["metadata"]["name"] for obj in informer.items()}
    assert len(recorder.relists) == 1


def test_resumes_after_each_watch_timeout_without_missing_or_repeating_events(
    api: client.ApiClient, core: client.CoreV1Api, kube_namespace: str, informers: list[Informer]
) -> None:
    """The server ends every watch after 1 s; changes spread over ~4 s straddle several
    reconnects, each resumed from the newest resourceVersion, never by a relist."""
    _, recorder = follow(informers, api, Resource("", "v1", "configmaps", namespace=kube_namespace), watch_timeout_s=1)
    names = [f"cm-{index}" for index in range(8)]
    for name in names:
        core.create_namespaced_config_map(kube_namespace, config_map(name))
        time.sleep(0.5)
    eventually(lambda: recorder.saw(*(("ADDED", name) for name in names)), "every ADDED", WAIT_S)
    time.sleep(2)  # two more reconnects: a resume from a stale resourceVersion would replay events
    assert [event for event in recorder.events if event[1] in names] == [("ADDED", name) for name in names]
    assert len(recorder.relists) == 1


@pytest.fixture(scope="module")
def widgets_crd(kube: KubeTestEnv) -> None:
    kube.load_crd(WIDGET_CRD)


def widget(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name}, "spec": {"size": 1}}


def test_relists_when_the_resource_version_is_gone(
    widgets_crd: None, api: client.ApiClient, kube_namespace: str, informers: list[Informer]
) -> None:
    """410 provoked for real: the Widget CRD's watch cache starts at the resourceVersion the
    server had when the CRD was created, so resuming from "1" is refused (here as an ERROR
    event with code 410 inside a 200 stream). The informer's remembered resourceVersion is
    set to "1" and the 1 s watch ends by itself; until the relist is seen the value is set
    again, in case a bookmark moved it meanwhile."""
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, widget("w1"))
    informer, recorder = follow(
        informers, api, Resource(GROUP, VERSION, PLURAL, namespace=kube_namespace), watch_timeout_s=1
    )
    assert recorder.relists == [{"w1"}]
    assert informer.get(kube_namespace, "w1")["spec"] == {"size": 1}

    def relisted() -> bool:
        if len(recorder.relists) < 2:
            informer._resource_version = "1"
            return False
        return True

    eventually(relisted, "a relist after 410 Gone", WAIT_S)
    assert recorder.relists[1] == {"w1"} and recorder.events == []
    # The watch goes on from the new list.
    objects.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, widget("w2"))
    eventually(lambda: recorder.saw(("ADDED", "w2")), "w2 ADDED after the relist", WAIT_S)


def test_a_relist_reports_objects_that_vanished_meanwhile_as_deleted(
    api: client.ApiClient, core: client.CoreV1Api, kube_namespace: str, informers: list[Informer]
) -> None:
    """A restarted informer begins with a relist: what was deleted while it was stopped is
    reported DELETED (synthesised: no watch saw it), what appeared comes with the relist."""
    core.create_namespaced_config_map(kube_namespace, config_map("kept", {"app": "x"}))
    core.create_namespaced_config_map(kube_namespace, config_map("removed", {"app": "x"}))
    resource = Resource("", "v1", "configmaps", namespace=kube_namespace, label_selector="app=x")
    informer, recorder = follow(informers, api, resource)
    assert recorder.relists == [{"kept", "removed"}]
    assert informer.stop(timeout_s=10)

    core.delete_namespaced_config_map("removed", kube_namespace)
    core.create_namespaced_config_map(kube_namespace, config_map("new", {"app": "x"}))
    informer.start()
    eventually(lambda: len(recorder.relists) == 2, "the relist after a restart", WAIT_S)
    assert recorder.events == [("DELETED", "removed")]
    assert recorder.relists[1] == {"kept", "new"}
    assert informer.get(kube_namespace, "removed") is None and informer.get(kube_namespace, "new") is not None


def test_label_selector_filters_and_label_changes_move_objects_in_and_out(
    api: client.ApiClient, core: client.CoreV1Api, kube_namespace: str, informers: list[Informer]
) -> None:
    core.create_namespaced_pod(kube_namespace, pod("serving", {"rayfleet.io/model": "m"}))
    core.create_namespaced_pod(kube_namespace, pod("other", {"app": "unrelated"}))
    resource = Resource("", "v1", "pods", namespace=kube_namespace, label_selector="rayfleet.io/model")
    informer, recorder = follow(informers, api, resource)
    assert recorder.relists == [{"serving"}]
    assert informer.get(kube_namespace, "serving")["kind"] == "Pod"

    core.patch_namespaced_pod("other", kube_namespace, {"metadata": {"labels": {"rayfleet.io/model": "m"}}})
    eventually(lambda: recorder.saw(("ADDED", "other")), "a pod that gained the label", WAIT_S)
    core.patch_namespaced_pod("serving", kube_namespace, {"metadata": {"labels": {"rayfleet.io/model": None}}})
    eventually(lambda: recorder.saw(("DELETED", "serving")), "a pod that lost the label", WAIT_S)
    assert [obj["metadata"]["name"] for obj in informer.items()] == ["other"]


def test_all_namespaces_and_stop_cuts_a_long_watch_short(
    api: client.ApiClient, core: client.CoreV1Api, kube_namespace: str, informers: list[Informer]
) -> None:
    """A watch the server would hold for 60 s: stop() cuts it rather than waiting."""
    core.create_namespaced_config_map(kube_namespace, config_map("here", {"informer-test": kube_namespace}))
    resource = Resource("", "v1", "configmaps", label_selector=f"informer-test={kube_namespace}")
    informer, recorder = follow(informers, api, resource, watch_timeout_s=60)
    assert recorder.relists == [{"here"}]
    time.sleep(1)  # the watch is open by now
    assert informer.stop(timeout_s=5)
    assert informer.get(kube_namespace, "here") is not None  # the cache outlives the loop
