"""Scale targets against the real thing: a Serve deployment through Serve's external-scaler API.

(The engine-pool target is exercised by tests/test_autoscaling_live.py; the Kubernetes scale
subresource target needs the test kube-apiserver of the fleet work.)
"""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve

from autoscaling.spec import ScaleTargetRef
from autoscaling.targets import ServeDeploymentTarget, target_for

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
