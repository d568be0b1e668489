"""Gateway endpoints discovered from Kubernetes pods (``serve_apps/kube_discovery.py``): the pure
pod -> endpoint rules, then the whole path on a real Ray cluster, the test kube-apiserver and a
real simulator process, with this test writing pod status as the kubelet would."""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import openai
import pytest
import ray
from kubernetes import client

from fleet.api import ANNOTATION_MODEL_NAME, ANNOTATION_PORT, LABEL_MODEL
from fleet.informer import new_api_client
from serve_apps.config import AppConfig
from serve_apps.kube_discovery import pod_endpoint
from serve_apps.registry import EndpointRegistry, get_registry
from tests.conftest import deploy_app
from tests.kube_env import KubeTestEnv
from tests.polling import eventually
from tests.simulator_fixtures import SimulatorProcess
from tests.test_gateway import post

MODEL = "acme/discovered-7b"
SLUG = "discovered-7b"
WAIT_S = 60.0


def serving_pod(
    name: str = "head",
    ready: bool = True,
    ports: list[dict] | None = None,
    annotations: dict[str, str] | None = None,
    ip: str = "10.0.0.5",
) -> dict:
    """A pod as the API returns it: a fleet head labelled for discovery, with its status."""
    return {
        "metadata": {
            "name": name, "namespace": "ns",
            "labels": {LABEL_MODEL: SLUG, "ray.io/node-type": "head"},
            "annotations": {ANNOTATION_MODEL_NAME: MODEL} if annotations is None else annotations,
        },
        "spec": {"containers": [{"name": "sidecar", "ports": [{"name": "metrics", "containerPort": 9090}]},
                                {"name": "ray-head", "ports": ports if ports is not None else
                                 [{"name": "gcs", "containerPort": 6379}, {"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def test_a_ready_pod_is_an_endpoint_named_after_it() -> None:
    endpoint = pod_endpoint(serving_pod())
    assert endpoint is not None
    assert (endpoint.name, endpoint.url, endpoint.model, endpoint.models) == (
        "ns.head", "http://10.0.0.5:8080", MODEL, [MODEL]
    )
    assert endpoint.source == "kubernetes" and endpoint.labels == {LABEL_MODEL: MODEL}
    assert not endpoint.ready  # until the registry's probe reaches it


@pytest.mark.parametrize(
    ("ports", "annotations", "url", "model"),
    [
        ([], {ANNOTATION_PORT: "9000"}, "http://10.0.0.5:9000", SLUG),
        ([], {}, "http://10.0.0.5:8000", SLUG),
        ([{"name": "http", "containerPort": 8001}], {ANNOTATION_PORT: "9000"}, "http://10.0.0.5:8001", SLUG),
    ],
)
def test_port_and_model_fall_back_in_order(ports: list[dict], annotations: dict, url: str, model: str) -> None:
    """Port: the container port named http, else the annotation, else 8000. Model: the
    annotation, else the label's slug."""
    endpoint = pod_endpoint(serving_pod(ports=ports, annotations=annotations))
    assert endpoint is not None and (endpoint.url, endpoint.model) == (url, model)


def test_ipv6_pods_get_a_bracketed_url() -> None:
    endpoint = pod_endpoint(serving_pod(ip="fd00::5"))
    assert endpoint is not None and endpoint.url == "http://[fd00::5]:8080"


@pytest.mark.parametrize(
    "change",
    [
        lambda pod: pod["status"]["conditions"][0].update(status="False"),
        lambda pod: pod["status"].update(conditions=[]),
        lambda pod: pod["status"].pop("podIP"),
        lambda pod: pod["metadata"].update(deletionTimestamp="2026-11-26T10:00:00Z"),
        lambda pod: pod["metadata"]["labels"].pop(LABEL_MODEL),
    ],
    ids=["not-ready", "no-conditions", "no-ip", "terminating", "unlabelled"],
)
def test_pods_that_may_not_take_traffic_are_no_endpoint(change: Callable[[dict], None]) -> None:
    pod = serving_pod()
    change(pod)
    assert pod_endpoint(pod) is None


def test_a_port_annotation_that_is_no_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="rayfleet.io/port='http' is not a port number"):
        pod_endpoint(serving_pod(ports=[], annotations={ANNOTATION_PORT: "http"}))


def test_a_replaced_registrant_withdraws_only_what_it_still_owns(ray_cluster: None) -> None:
    """The hand-over between discovery replicas, on a registry actor of its own: the
    successor claims the pod as it is, and its predecessor's withdrawal then leaves it alone."""
    registry = EndpointRegistry.remote(health_interval_s=3600)  # no probes: the pod is not reachable
    try:
        pod = pod_endpoint(serving_pod())
        assert pod is not None
        ray.get(registry.register.remote(pod.model_copy(update={"owner": "old", "ready": True})))
        version = ray.get(registry.snapshot.remote()).version
        assert ray.get(registry.claim.remote(pod.name, "new"))
        ray.get(registry.deregister.remote(pod.name, "old"))
        snapshot = ray.get(registry.snapshot.remote())
        assert [(e.owner, e.ready) for e in snapshot.endpoints] == [("new", True)]
        assert snapshot.version == version  # a claim changes no route: gateways need not refresh
        ray.get(registry.deregister.remote(pod.name, "new"))
        assert not ray.get(registry.snapshot.remote()).endpoints
        assert not ray.get(registry.claim.remote(pod.name, "new"))
    finally:
        ray.kill(registry, no_restart=True)


def test_discovery_config_defaults_to_every_namespace_in_cluster() -> None:
    config = AppConfig.model_validate({"kubernetes_discovery": {}, "models": [{"name": MODEL}]})
    assert config.kubernetes_discovery is not None
    assert config.kubernetes_discovery.model_dump() == {
        "namespace": None, "label_selector": LABEL_MODEL, "kubeconfig": None
    }


# The whole path: Ray, Serve, the apiserver, a simulator.


@pytest.fixture
def core(kube: KubeTestEnv) -> Iterator[client.CoreV1Api]:
    with new_api_client(str(kube.kubeconfig_path)) as api_client:
        yield client.CoreV1Api(api_client)


def namespaced_pod_watches(kube: KubeTestEnv) -> int:
    """Pod watches open on the apiserver in one namespace (the controller-manager's are
    cluster-wide), from its own metrics."""
    request = urllib.request.Request(f"{kube.server_url}/metrics", headers={"Authorization": f"Bearer {kube.token}"})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        metrics = response.read().decode()
    pattern = r'apiserver_longrunning_gauge\{[^}]*resource="pods",scope="namespace",subresource="",verb="WATCH"[^}]*\} (\S+)'
    found = re.search(pattern, metrics)
    return int(float(found.group(1))) if found else 0


def set_ready(core: client.CoreV1Api, namespace: str, name: str, ready: bool) -> None:
    """What the kubelet would write: the pod runs on loopback and passes (or fails) readiness."""
    status = "True" if ready else "False"
    core.patch_namespaced_pod_status(name, namespace, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": status}, {"type": "ContainersReady", "status": status}],
    }})  # fmt: skip


def kubernetes_endpoints() -> list[str]:
    return [e.name for e in ray.get(get_registry().snapshot.remote()).endpoints if e.source == "kubernetes"]


def owners() -> set[str]:
    """The discovery replicas that hold the registry's Kubernetes endpoints."""
    return {e.owner for e in ray.get(get_registry().snapshot.remote()).endpoints if e.source == "kubernetes"}


@pytest.mark.k8s
@pytest.mark.timeout(300)
def test_the_gateway_routes_to_ready_pods_and_stops_when_they_go(
    kube: KubeTestEnv,
    kube_namespace: str,
    core: client.CoreV1Api,
    gateway_port: int,
    simulator_factory: Callable[..., SimulatorProcess],
) -> None:
    """A pod standing for a fleet head, served by a simulator on loopback. The model is only
    configured, so "no pod ready" answers 503 (not 400, unknown model)."""
    simulator = simulator_factory("--gpu", "instant", "--time-scale", "0", model=MODEL)
    port = int(simulator.url.rsplit(":", 1)[1])
    watches_before = namespaced_pod_watches(kube)
    config = {
        "gateway": {"seed": 7},
        "kubernetes_discovery": {"namespace": kube_namespace, "kubeconfig": str(kube.kubeconfig_path)},
        "models": [{"name": MODEL}],  # no pool, no static endpoint: discovery is its only source
    }
    url = deploy_app(config, gateway_port, expected_ready=0)
    eventually(lambda: namespaced_pod_watches(kube) == watches_before + 1, "the discovery's pod watch", WAIT_S)
    llm = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()

    def refused() -> bool:
        status, _, payload = post(f"{url}/v1/chat/completions", body)
        return status == 503 and json.loads(payload)["error"]["code"] == "no_ready_endpoint"

    def served() -> bool:
        try:
            raw = llm.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        except openai.APIStatusError as error:
            assert error.status_code == 503, error
            return False
        assert raw.headers["target-pod"] == f"{kube_namespace}.head"
        assert raw.parse().choices[0].message.content
        return True

    head = {
        "metadata": {
            "name": "head",
            "labels": {LABEL_MODEL: SLUG, "ray.io/node-type": "head"},
            "annotations": {ANNOTATION_MODEL_NAME: MODEL},
        },
        "spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray",
                                 "ports": [{"name": "gcs", "containerPort": 6379},
                                           {"name": "http", "containerPort": port}]}]},
    }  # fmt: skip
    core.create_namespaced_pod(kube_namespace, head)
    eventually(refused, "503 while the pod is not ready", WAIT_S)
    assert kubernetes_endpoints() == []

    set_ready(core, kube_namespace, "head", True)
    eventually(served, "a response from the discovered pod", WAIT_S)

    set_ready(core, kube_namespace, "head", False)
    eventually(refused, "503 once the pod is not ready", WAIT_S)
    assert kubernetes_endpoints() == []

    set_ready(core, kube_namespace, "head", True)
    eventually(served, "the pod back once ready again", WAIT_S)
    core.delete_namespaced_pod("head", kube_namespace)
    eventually(refused, "503 once the pod is deleted", WAIT_S)

    # A changed discovery config: Serve replaces the replica, and the pod stays in the
    # registry all along (the successor claims it before its predecessor withdraws its own).
    core.create_namespaced_pod(kube_namespace, head)
    set_ready(core, kube_namespace, "head", True)
    eventually(lambda: kubernetes_endpoints() == [f"{kube_namespace}.head"], "the recreated pod", WAIT_S)
    (first_owner,) = owners()
    samples: list[list[str]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(kubernetes_endpoints())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        config["kubernetes_discovery"]["label_selector"] = f"{LABEL_MODEL},ray.io/node-type=head"
        deploy_app(config, gateway_port, expected_ready=0)
        eventually(lambda: first_owner not in owners(), "the successor's claim", WAIT_S)
        eventually(lambda: namespaced_pod_watches(kube) == watches_before + 1, "the old replica's watch closed", WAIT_S)
        time.sleep(1.0)  # the old replica withdraws right after closing its watch
    finally:
        stop_sampling.set()
        sampler.join()
    assert samples and all(names == [f"{kube_namespace}.head"] for names in samples), samples
    assert served()

    # Redeployed without discovery: its replica goes, with its watch and its endpoints.
    del config["kubernetes_discovery"]
    deploy_app(config, gateway_port, expected_ready=0)
    eventually(lambda: kubernetes_endpoints() == [], "the endpoints withdrawn", WAIT_S)
    eventually(lambda: namespaced_pod_watches(kube) == watches_before, "the watch closed", WAIT_S)
    assert refused()
