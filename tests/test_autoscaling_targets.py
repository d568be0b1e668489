"""Scale targets against the real thing: a Serve deployment through Serve's external-scaler API,
and a Deployment's scale subresource on a real kube-apiserver.

(The engine-pool target is exercised by tests/test_autoscaling_live.py.) The Kubernetes target
runs against the real kube-apiserver of ``tests/kube_env.py``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve

from autoscaling.spec import ScaleTargetRef
from autoscaling.targets import KubernetesScaleTarget, Scale, ServeDeploymentTarget, target_for
from tests.kube_env import KubeTestEnv

pytestmark = pytest.mark.timeout(180)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Echo:
    def __call__(self, request: object) -> str:
        return "ok"


def test_serve_deployment_target_reads_and_sets_replicas(gateway_port: int) -> None:
    serve.run(Echo.bind(), name="scaled-echo", route_prefix="/scaled-echo", external_scaler_enabled=True)
    target = target_for(ScaleTargetRef(kind="ServeDeployment", name="scaled-echo/Echo"))
    assert isinstance(target, ServeDeploymentTarget)
    try:
        assert asyncio.run(target.get_scale()).replicas == 1
        asyncio.run(target.set_scale(2))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and asyncio.run(target.get_scale()).ready < 2:
            time.sleep(0.5)
        scale = asyncio.run(target.get_scale())
        assert (scale.replicas, scale.ready) == (2, 2)
    finally:
        serve.delete("scaled-echo")


def test_serve_deployment_names_must_be_app_slash_deployment() -> None:
    with pytest.raises(ValueError, match="app/deployment"):
        target_for(ScaleTargetRef(kind="ServeDeployment", name="just-a-name"))


@pytest.mark.k8s
def test_kubernetes_scale_target_scales_a_deployment_through_its_scale_subresource(
    kube: KubeTestEnv, kube_namespace: str
) -> None:
    """Against the real kube-apiserver: what HPA does to a Deployment, the target does too."""
    from kubernetes import client

    with kube.api_client() as api_client:
        labels = {"app": "scaled"}
        deployment = client.V1Deployment(
            metadata=client.V1ObjectMeta(name="scaled"),
            spec=client.V1DeploymentSpec(
                replicas=1, selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(
                    containers=[client.V1Container(name="engine", image="vllm/vllm-openai")])),
            ),
        )  # fmt: skip
        client.AppsV1Api(api_client).create_namespaced_deployment(kube_namespace, deployment)
        ref = ScaleTargetRef(apiVersion="apps/v1", kind="Deployment", name="scaled", namespace=kube_namespace)
        target = KubernetesScaleTarget(ref, api_client)
        assert asyncio.run(target.get_scale()) == Scale(1, 0)  # no kubelet here: nothing gets ready
        asyncio.run(target.set_scale(3))
        read = client.AppsV1Api(api_client).read_namespaced_deployment_scale("scaled", kube_namespace)
        assert read.spec.replicas == 3 and asyncio.run(target.get_scale()).replicas == 3
        assert target.describe() == f"Deployment/{kube_namespace}/scaled"
