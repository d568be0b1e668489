"""Endpoints from Kubernetes: serving pods (the heads of a RayClusterFleet's clusters, or any
pod labelled ``rayfleet.io/model``) kept in step with the endpoint registry.

A one-replica Serve deployment, like ``KVIndexManager``, so it is deployed, replaced and
deleted with the application, and its watch with it. An informer (``fleet.informer``)
follows the pods in a daemon thread and wakes a level-triggered reconcile on every change,
and every ``RESYNC_S`` anyway: the registry's ``kubernetes`` endpoints are made equal to
the pods that may take traffic now, whatever happened in between (a relist, a restarted
registry, a previous replica that deregistered on its way out).

Kubernetes says whether a pod may take traffic (Ready, an IP, not terminating); the
registry's own probes then say whether the gateway can reach it. A pod that is not Ready
is left out rather than registered as not ready, since those probes would soon mark a
reachable engine ready against the kubelet's word.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from fleet.api import ANNOTATION_MODEL_NAME, ANNOTATION_PORT, LABEL_MODEL
from fleet.informer import Informer, Resource, new_api_client
from serve_apps.config import KubernetesDiscoveryConfig
from serve_apps.endpoints import Endpoint
from serve_apps.registry import get_registry

logger = logging.getLogger(__name__)

SOURCE = "kubernetes"
PORT_NAME = "http"  # the container port a serving pod names for its OpenAI API
DEFAULT_PORT = 8000  # vLLM's
RESYNC_S = 5.0


def pod_port(pod: dict) -> int:
    """The container port named ``http`` on any container, else the ``rayfleet.io/port``
    annotation, else vLLM's 8000."""
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == PORT_NAME:
                return int(port["containerPort"])
    annotation = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_PORT)
    if annotation is None:
        return DEFAULT_PORT
    try:
        return int(annotation)
    except ValueError:
        raise ValueError(f"annotation {ANNOTATION_PORT}={annotation!r} is not a port number") from None


def is_serving(pod: dict) -> bool:
    """Whether the pod may take traffic: Ready, with an IP, not terminating, still labelled."""
    metadata, status = pod["metadata"], pod.get("status") or {}
    if metadata.get("deletionTimestamp") or not status.get("podIP"):
        return False
    if not (metadata.get("labels") or {}).get(LABEL_MODEL):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_endpoint(pod: dict) -> Endpoint | None:
    """The endpoint a serving pod stands for, named ``<namespace>.<pod>`` (a namespace has no
    dots, so the name is unique); None for a pod that may not take traffic. Registered not
    ready: the registry's first probe (seconds) shows the gateway can reach it.

    Raises ``ValueError`` for a pod that says its port wrongly."""
    if not is_serving(pod):
        return None
    metadata = pod["metadata"]
    model = (metadata.get("annotations") or {}).get(ANNOTATION_MODEL_NAME) or metadata["labels"][LABEL_MODEL]
    ip = pod["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(
        name=f"{metadata['namespace']}.{metadata['name']}", url=f"http://{host}:{pod_port(pod)}",
        model=model, models=[model], ready=False, labels={LABEL_MODEL: model}, source=SOURCE,
    )  # fmt: skip


def same_target(registered: Endpoint, wanted: Endpoint) -> bool:
    """Whether a registered endpoint already is ``wanted``; its readiness and served names
    are the registry's to keep (registering again would reset them)."""
    return (registered.url, registered.model, registered.labels) == (wanted.url, wanted.model, wanted.labels)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10)
class KubeDiscovery:
    """Keeps the registry's ``kubernetes`` endpoints equal to the serving pods."""

    async def __init__(self, config: dict) -> None:
        self.config = KubernetesDiscoveryConfig.model_validate(config)
        self.registry = get_registry()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._bad_pods: dict[str, str] = {}  # pod -> why it cannot be routed to, logged once
        pods = self.config
        resource = Resource("", "v1", "pods", namespace=pods.namespace, label_selector=pods.label_selector)
        self.informer = Informer(new_api_client(self.config.kubeconfig), resource, self._wake, self._wake)
        self.informer.start()
        self._task = self._loop.create_task(self._reconcile_loop())

    def _wake(self, *_: object) -> None:
        """An informer callback (its thread): reconcile now rather than at the next resync."""
        self._loop.call_soon_threadsafe(self._changed.set)

    def wanted(self) -> dict[str, Endpoint]:
        endpoints: dict[str, Endpoint] = {}
        bad: dict[str, str] = {}
        for pod in self.informer.items():
            try:
                endpoint = pod_endpoint(pod)
            except ValueError as exc:
                key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                bad[key] = str(exc)
                if self._bad_pods.get(key) != bad[key]:
                    logger.warning("pod %s is not routed to: %s", key, exc)
                continue
            if endpoint is not None:
                endpoints[endpoint.name] = endpoint
        self._bad_pods = bad
        return endpoints

    async def reconcile(self) -> None:
        wanted = self.wanted()
        snapshot = await self.registry.snapshot.remote()
        registered = {e.name: e for e in snapshot.endpoints if e.source == SOURCE}
        for name in registered.keys() - wanted.keys():
            await self.registry.deregister.remote(name)
        for name, endpoint in wanted.items():
            if name not in registered or not same_target(registered[name], endpoint):
                await self.registry.register.remote(endpoint)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), RESYNC_S)
            except TimeoutError:
                pass
            self._changed.clear()
            if not self.informer.has_synced():  # an empty cache is not "no pods"
                continue
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - a bad tick (a restarting registry) must not end reconciling
                logger.exception("Kubernetes discovery reconcile failed; retrying")
                self.registry = get_registry()

    async def __del__(self) -> None:
        """Stop watching and withdraw the pods: an application redeployed without discovery
        must not keep routing to them. A replica replacing this one registers them again."""
        self._task.cancel()
        await asyncio.to_thread(self.informer.stop)
        snapshot = await self.registry.snapshot.remote()
        await asyncio.gather(
            *(self.registry.deregister.remote(e.name) for e in snapshot.endpoints if e.source == SOURCE)
        )
