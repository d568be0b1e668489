"""Test-side stand-ins for what cannot run here, for the fleet controller's tests: KubeRay
(it writes RayCluster status as the operator would) and an observer of the watch stream
that records, after every event, how many clusters exist and how many are available.

Both follow RayClusters with the project's own ``fleet.informer``, so they see what any
client watching the real API server sees.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from fleet.api import GROUP, LABEL_FLEET, LABEL_REVISION_HASH, PLURAL, RAY_GROUP, RAY_PLURAL, RAY_VERSION, VERSION
from fleet.clusters import view_cluster
from fleet.informer import Informer, Resource
from fleet.progress import timestamp

REPO = Path(__file__).resolve().parents[1]
BROKEN_GRACE_S = 2.0  # the controllers here replace a broken cluster after this long


def fleet_body(name: str, replicas: int = 4, max_surge: int | str = 1, max_unavailable: int | str = 0,
               version: str = "v1", **spec: Any) -> dict:  # fmt: skip
    """A small fleet; ``version`` goes into the head's environment, so changing it is a new template."""
    labels = {"app.kubernetes.io/name": name}
    head = {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.40.0",
                            "env": [{"name": "MODEL_VERSION", "value": version}]}]}  # fmt: skip
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayClusterFleet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": max_surge, "maxUnavailable": max_unavailable}},
            "template": {"metadata": {"labels": labels},
                         "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": head}}}},
            **spec,
        },
    }  # fmt: skip


def with_version(fleet: dict, version: str) -> dict:
    """The fleet's spec with a new template (a merge patch body)."""
    spec = copy.deepcopy(fleet["spec"])
    spec["template"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = version
    return {"spec": {"template": spec["template"]}}


class Fleets:
    """The calls the tests make on fleets, in one namespace."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.namespace = namespace

    def create(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def patch(self, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, patch)

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def clusters(self, fleet: str | None = None) -> list[dict]:
        """The namespace's RayClusters, or one fleet's."""
        selector = f"{LABEL_FLEET}={fleet}" if fleet else None
        return self.custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, label_selector=selector
        )["items"]

    def revisions(self, name: str) -> list:
        return self.apps.list_namespaced_controller_revision(self.namespace, label_selector=f"rayfleet.io/fleet={name}").items

    def condition(self, name: str, kind: str) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def settled(self, name: str, replicas: int) -> bool:
        """The rollout is complete: every cluster on the current template and available."""
        fleet = self.get(name)
        status = fleet.get("status") or {}
        return (
            status.get("observedGeneration") == fleet["metadata"]["generation"]
            and status.get("updatedReplicas") == replicas
            and status.get("availableReplicas") == replicas
            and status.get("replicas") == replicas
            and len([c for c in self.clusters(name) if not c["metadata"].get("deletionTimestamp")]) == replicas
        )


def ready_status(cluster: dict, ready: bool = True) -> dict:
    now = timestamp(time.time())
    provisioned = ready or any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
                               for c in (cluster.get("status") or {}).get("conditions", []))  # fmt: skip
    return {"status": {
        "state": "ready" if ready else "",
        "readyWorkerReplicas": 0, "desiredWorkerReplicas": 0,
        "conditions": [
            {"type": "RayClusterProvisioned", "status": "True" if provisioned else "False",
             "reason": "AllPodRunningAndReadyFirstTime" if provisioned else "RayClusterPodsProvisioning",
             "message": "", "lastTransitionTime": now},
            {"type": "HeadPodReady", "status": "True" if ready else "False",
             "reason": "HeadPodRunningAndReady" if ready else "HeadPodNotReady", "message": "", "lastTransitionTime": now},
        ],
    }}  # fmt: skip


class FakeKubeRay:
    """Makes every new RayCluster ready after ``ready_after_s``, unless its revision is held
    back (a crash-looping template); ``break_cluster`` turns a ready one not ready."""

    def __init__(self, api_client: Any, namespace: str, ready_after_s: float = 0.3) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.ready_after_s = ready_after_s
        self.held_revisions: set[str] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.informer = Informer(api_client, Resource(RAY_GROUP, RAY_VERSION, RAY_PLURAL, namespace),
                                 on_event=self._on_event)  # fmt: skip

    def _on_event(self, kind: str, cluster: dict) -> None:
        name = cluster["metadata"]["name"]
        with self._lock:
            if kind != "ADDED" or name in self._seen:
                return
            self._seen.add(name)
        if (cluster["metadata"].get("labels") or {}).get(LABEL_REVISION_HASH) in self.held_revisions:
            return
        timer = threading.Timer(self.ready_after_s, self._write, (name, ready_status(cluster)))
        timer.daemon = True
        timer.start()

    def _write(self, name: str, status: dict) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, name, status)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    def break_cluster(self, cluster: dict) -> None:
        self._write(cluster["metadata"]["name"], ready_status(cluster, ready=False))

    def __enter__(self) -> FakeKubeRay:
        self.informer.start()
        self.informer.wait_synced(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.informer.stop()


@dataclass
class Observation:
    total: int
    available: int
    revisions: frozenset[str]


@dataclass
class WatchObserver:
    """After every RayCluster watch event: clusters that exist (deleting ones included) and
    clusters available (ready and not deleting; the tests use minReadySeconds 0)."""

    api_client: Any
    namespace: str
    seen: list[Observation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.informer = Informer(self.api_client, Resource(RAY_GROUP, RAY_VERSION, RAY_PLURAL, self.namespace),
                                 on_event=lambda *_: self._record())  # fmt: skip

    def _record(self) -> None:
        views = [view_cluster(c) for c in self.informer.items()]
        self.seen.append(Observation(
            total=len(views), available=sum(v.ready and not v.deleting for v in views),
            revisions=frozenset(v.revision for v in views),
        ))  # fmt: skip

    def __enter__(self) -> WatchObserver:
        self.informer.start()
        self.informer.wait_synced(30)
        self._record()
        return self

    def __exit__(self, *exc: object) -> None:
        self.informer.stop()


@contextmanager
def controller_in_process(api_client: Any, namespace: str) -> Iterator[Any]:
    from fleet.ray_cluster_fleet import FleetController

    controller = FleetController(api_client, namespace, broken_grace_s=BROKEN_GRACE_S)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def controller_command(kubeconfig: Path, namespace: str, identity: str, lease_namespace: str,
                       lease_duration_s: float = 4.0, renew_deadline_s: float = 3.0, retry_period_s: float = 0.5) -> list[str]:  # fmt: skip
    """A controller process, as ``rayfleet fleet controller`` runs it, with short lease times."""
    call = (f"import sys; from fleet.ray_cluster_fleet import run_controller; sys.exit(run_controller("
            f"namespace={namespace!r}, lease_namespace={lease_namespace!r}, lease_name='fleet-controller', "
            f"identity={identity!r}, kubeconfig={str(kubeconfig)!r}, lease_duration_s={lease_duration_s}, "
            f"renew_deadline_s={renew_deadline_s}, retry_period_s={retry_period_s}))")  # fmt: skip
    return [sys.executable, "-c", call]
