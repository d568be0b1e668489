"""Shared fixtures: a real local Ray cluster, the rayfleet Serve application on it, and
simulator processes. Nothing here is mocked; the fixtures only choose small, fast settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayfleet.ports import free_port

pytest_plugins = ["tests.simulator_fixtures", "tests.redis_fixtures", "tests.kube_fixtures", "tests.kuberay_fixtures"]

MODEL = "test-model"
# The shared workload traces sit next to the repository (``../shared``); checks that need
# them are skipped on a clone without them.
SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the session, with the Serve settings ``rayfleet up`` uses."""
    import ray

    from rayfleet.stack import kill_haproxy, serve_environment
    from serve_apps.registry import NAMESPACE

    os.environ.update(serve_environment())
    ray.init(namespace=NAMESPACE, num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    yield
    # No serve.shutdown(): it waits 30 s for the controller to drain before giving up, and
    # ending the cluster stops every actor anyway; only Serve's HAProxy outlives it.
    ray.shutdown()
    kill_haproxy(node_id)


@pytest.fixture(scope="session")
def gateway_port(ray_cluster: None) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy_app(config: dict, port: int, expected_ready: int, timeout_s: float = 90.0) -> str:
    """(Re)deploy the rayfleet application and wait until the gateway sees the engines."""
    import urllib.request

    import ray
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.registry import get_registry

    serve.run(build_app(config), name="rayfleet", route_prefix="/", blocking=False)
    registry = get_registry()
    names = {m["name"] for m in config.get("models", []) if m.get("pool")}
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        snapshot = ray.get(registry.snapshot.remote())
        ready = [e for e in snapshot.endpoints if e.ready and e.model in names]
        if len(ready) >= expected_ready:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                    if all(name.encode() in response.read() for name in names):
                        return url
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"{expected_ready} engines not ready in {timeout_s}s: {snapshot.endpoints}")


def pool_config(replicas: int = 2, gpu: str = "instant", time_scale: float = 1.0, **gateway: object) -> dict:
    """An application config with one simulated pool serving ``MODEL``."""
    return {
        "gateway": {"seed": 7, **gateway},
        "models": [
            {
                "name": MODEL,
                "pool": {
                    "replicas": replicas,
                    "engine_config": {"model": MODEL, "sim": {"gpu": gpu, "time_scale": time_scale}},
                },
            }
        ],
    }
