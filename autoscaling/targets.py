"""What an autoscaler scales: one small interface, three kinds of target.

- ``EnginePool``: a model's engine pool in the rayfleet application (``rayfleet up``), through
  the ``EngineManager`` deployment, which starts new engines and drains removed ones.
- ``ServeDeployment`` (name ``app/deployment``): any Serve deployment, through Serve's own
  external-scaler API (the application must be deployed with ``external_scaler_enabled``).
- Anything else (``Deployment``, ``RayClusterFleet``, ...): a Kubernetes object's ``scale``
  subresource through the ``kubernetes`` client, the way HPA scales it.

Calls happen on the autoscaler's tick, never on a request's path, so handle hops are fine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from autoscaling.spec import ScaleTargetRef

APP_NAME = "rayfleet"


@dataclass(frozen=True)
class Scale:
    """``replicas``: what the target has now, starting ones included; ``ready``: serving."""

    replicas: int
    ready: int


class ScaleTarget(Protocol):
    def describe(self) -> str: ...

    async def get_scale(self) -> Scale: ...

    async def set_scale(self, replicas: int) -> None: ...


class EnginePoolTarget:
    """A model's engine pool, scaled by the application's ``EngineManager``."""

    def __init__(self, model: str, app_name: str = APP_NAME) -> None:
        self.model = model
        self.app_name = app_name

    def describe(self) -> str:
        return f"EnginePool/{self.model}"

    def _manager(self):  # type: ignore[no-untyped-def]
        from ray import serve

        return serve.get_deployment_handle("EngineManager", app_name=self.app_name)

    async def get_scale(self) -> Scale:
        pool = await self._manager().pool_scale.remote(self.model)
        return Scale(pool["replicas"], pool["ready"])

    async def set_scale(self, replicas: int) -> None:
        await self._manager().scale_pool.remote(self.model, replicas)


class ServeDeploymentTarget:
    """A Serve deployment, through the controller's external-scaler API."""

    def __init__(self, name: str) -> None:
        app, _, deployment = name.partition("/")
        if not deployment:
            raise ValueError(f"a ServeDeployment target is named 'app/deployment', not {name!r}")
        self.app, self.deployment = app, deployment

    def describe(self) -> str:
        return f"ServeDeployment/{self.app}/{self.deployment}"

    async def get_scale(self) -> Scale:
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app)
        deployment = app.deployments.get(self.deployment) if app is not None else None
        if deployment is None:
            raise LookupError(f"no Serve deployment {self.deployment!r} in application {self.app!r}")
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        running = states.get("RUNNING", 0)
        return Scale(running + states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0), running)

    async def set_scale(self, replicas: int) -> None:
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        await controller.update_deployment_replicas.remote(DeploymentID(name=self.deployment, app_name=self.app), replicas)


class KubernetesScaleTarget:
    """A Kubernetes object with a ``scale`` subresource (Deployment, StatefulSet, RayClusterFleet)."""

    def __init__(self, ref: ScaleTargetRef, api_client: Any = None) -> None:
        """``api_client``: a ``kubernetes.client.ApiClient``; default, the in-cluster service
        account, else the local kubeconfig (as kubectl finds it)."""
        self.ref = ref
        self._api_client = api_client
        self.namespace = ref.namespace or "default"
        group_version = ref.apiVersion or ("apps/v1" if ref.kind in ("Deployment", "StatefulSet") else "")
        if not group_version:
            raise ValueError(f"scaleTargetRef for kind {ref.kind!r} needs apiVersion (e.g. orchestration.rayfleet.io/v1alpha1)")
        self.group, _, self.version = group_version.rpartition("/")
        self.plural = ref.kind.lower() + "s"

    def describe(self) -> str:
        return f"{self.ref.kind}/{self.namespace}/{self.ref.name}"

    def _api(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        return client.AppsV1Api(self._api_client) if self.group == "apps" else client.CustomObjectsApi(self._api_client)

    async def get_scale(self) -> Scale:
        def read() -> Scale:
            api = self._api()
            if self.group == "apps":
                obj = getattr(api, f"read_namespaced_{self.ref.kind.lower()}")(self.ref.name, self.namespace)
                return Scale(obj.spec.replicas or 0, obj.status.ready_replicas or 0)
            obj = api.get_namespaced_custom_object(self.group, self.version, self.namespace, self.plural, self.ref.name)
            status = obj.get("status", {})
            return Scale(int(obj.get("spec", {}).get("replicas", 0)), int(status.get("readyReplicas", 0)))

        return await asyncio.to_thread(read)

    async def set_scale(self, replicas: int) -> None:
        def write() -> None:
            api = self._api()
            body = {"spec": {"replicas": replicas}}
            if self.group == "apps":
                getattr(api, f"patch_namespaced_{self.ref.kind.lower()}_scale")(self.ref.name, self.namespace, body)
            else:
                api.patch_namespaced_custom_object_scale(
                    self.group, self.version, self.namespace, self.plural, self.ref.name, body
                )

        await asyncio.to_thread(write)


def target_for(ref: ScaleTargetRef) -> ScaleTarget:
    if ref.kind == "EnginePool":
        return EnginePoolTarget(ref.name)
    if ref.kind == "ServeDeployment":
        return ServeDeploymentTarget(ref.name)
    return KubernetesScaleTarget(ref)
