"""Endpoints from Kubernetes: serving pods (the heads of a RayClusterFleet's clusters, or any
pod labelled ``rayfleet.io/model``) kept in step with the endpoint registry.

A one-replica Serve deployment, like ``KVIndexManager``, so it is deployed, replaced and
deleted with the application, and its watch with it. An informer (``fleet.informer``)
follows the pods in a daemon thread and wakes a level-triggered reconcile on every change,
and every ``RESYNC_S`` anyway: the registry's ``kubernetes`` endpoints are made equal to
the pods that may take traffic now, whatever happened in between (a relist, a restarted
registry, a previous replica that deregistered on its way out).

Each replica owns what it registers (``Endpoint.owner``) and claims its predecessor's
endpoints as they are. On its way out a replica waits for those claims and withdraws only
what it still owns: when Serve replaces it (an upgrade, a changed discovery config), the
pods stay routable throughout; when the application drops discovery, nobody claims them
and they go after the hand-over wait.

Kubernetes says whether a pod may take traffic (Ready, an IP, not terminating); the
registry's own probes then say whether the gateway can reach it. A pod that is not Ready
is left out rather than registered as not ready, since those probes would soon mark a
reachable engine ready against the kubelet's word.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

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
HANDOVER_S = 15.0  # how long a replica on its way out waits for its successor's claims
HANDOVER_POLL_S = 0.5


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


# Serve's default graceful shutdown (20 s) would cut the hand-over short on a loaded node.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10,
                  graceful_shutdown_timeout_s=HANDOVER_S + 15)
class KubeDiscovery:
    """Keeps the registry's ``kubernetes`` endpoints equal to the serving pods."""

    async def __init__(self, config: dict) -> None:
        self.config = KubernetesDiscoveryConfig.model_validate(config)
        self.registry = get_registry()
        self.owner = uuid.uuid4().hex
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
                endpoints[endpoint.name] = endpoint.model_copy(update={"owner": self.owner})
        self._bad_pods = bad
        return endpoints

    async def reconcile(self) -> None:
        wanted = self.wanted()
        snapshot = await self.registry.snapshot.remote()
        registered = {e.name: e for e in snapshot.endpoints if e.source == SOURCE}
        for name in registered.keys() - wanted.keys():
            await self.registry.deregister.remote(name)
        for name, endpoint in wanted.items():
            current = registered.get(name)
            if current is None or not same_target(current, endpoint):
                await self.registry.register.remote(endpoint)
            elif current.owner != self.owner and not await self.registry.claim.remote(name, self.owner):
                await self.registry.register.remote(endpoint)  # withdrawn between snapshot and claim

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
        """Stop watching, hand the pods over, and withdraw those nobody took.

        Serve stops a replaced replica while its successor starts, and the successor needs
        a few seconds (a process, a pod list) before it claims the pods: withdrawing them at
        once would leave the model without endpoints, and every request 503, in between.
        So this waits up to ``HANDOVER_S`` for the claims. An application redeployed without
        discovery has no successor, and its pods go when the wait ends.
        """
        self._task.cancel()
        await asyncio.to_thread(self.informer.stop)
        deadline = self._loop.time() + HANDOVER_S
        while True:
            snapshot = await self.registry.snapshot.remote()
            owned = [e.name for e in snapshot.endpoints if e.source == SOURCE and e.owner == self.owner]
            if not owned or self._loop.time() >= deadline:
                break
            await asyncio.sleep(HANDOVER_POLL_S)
        await asyncio.gather(*(self.registry.deregister.remote(name, self.owner) for name in owned))
