"""``manifests/`` and ``rayfleet fleet render``: everything kustomize renders, and every sample, is
valid against the schema that will judge it in a cluster. Our RayClusterFleets against our CRD
and ``fleet/api.py``, their RayCluster templates against KubeRay's schema, the RayService against
KubeRay's, built-in kinds and the CRD itself against the real v1.20 apiserver (server dry-run)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fleet.api import (
    ANNOTATION_MODEL_NAME,
    CONTROLLER_LABELS,
    GROUP,
    KIND,
    LABEL_MODEL,
    PLURAL,
    VERSION,
    Condition,
    FleetSpec,
    FleetStatus,
    RollingUpdate,
    Strategy,
)
from fleet.render import DEFAULT_IMAGE, LABEL_APP_NAME, model_label, render_fleet
from rayfleet.cli import build_parser, main
from rayfleet.stack import SERVE_ENV
from serve_apps.config import AppConfig
from tests.kube_env import KubeTestEnv
from tests.kuberay import (
    RAYCLUSTER_CRD,
    SchemaViolation,
    fleet_crd,
    rayservice_crd,
    validate_against_crd,
    validate_raycluster_spec,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
SAMPLES = sorted((MANIFESTS / "samples").glob("*.yaml"))
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FLEET = (GROUP, VERSION)


def kubectl() -> str:
    """kubectl's path; without it the test skips, except in CI (``CI=true``), where that is a failure."""
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not installed (it renders manifests/ with its embedded kustomize)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    """What ``kubectl apply -k manifests/`` would send."""
    out = subprocess.run([kubectl(), "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def render_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# --- what kustomize renders ---------------------------------------------------------------


def test_kustomize_renders_every_manifest(rendered: list[dict]) -> None:
    kinds = sorted(f"{obj['kind']}/{obj['metadata']['name']}" for obj in rendered)
    assert kinds == sorted([
        "Namespace/rayfleet-system",
        f"CustomResourceDefinition/{PLURAL}.{GROUP}",
        "ServiceAccount/rayfleet-controller", "ServiceAccount/rayfleet-gateway",
        "ClusterRole/rayfleet-controller", "ClusterRole/rayfleet-gateway",
        "ClusterRoleBinding/rayfleet-controller", "ClusterRoleBinding/rayfleet-gateway",
        "Deployment/rayfleet-controller",
        "RayService/rayfleet-gateway",
    ])  # fmt: skip


def test_the_image_is_set_by_kustomize(tmp_path: Path) -> None:
    """``kustomize edit set image rayfleet=...`` reaches the controller and the gateway (a RayService)."""
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    kustomization["images"] = [{"name": "rayfleet", "newName": "registry.example/rayfleet", "newTag": "v9"}]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run([kubectl(), "kustomize", str(copy)], capture_output=True, text=True, check=True).stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    controller = of_kind(objects, "Deployment")[0]["spec"]["template"]
    gateway = of_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert [c["image"] for c in containers(controller) + containers(gateway)] == ["registry.example/rayfleet:v9"] * 2


def test_the_fleet_crd_mirrors_the_pydantic_models() -> None:
    """The CRD and ``fleet/api.py`` describe the same object: fields and defaults."""
    schema = fleet_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    spec, status = schema["spec"]["properties"], schema["status"]["properties"]
    assert set(spec) == set(FleetSpec.model_fields)
    assert set(status) == set(FleetStatus.model_fields)
    assert set(status["conditions"]["items"]["properties"]) == set(Condition.model_fields)
    assert set(spec["strategy"]["properties"]) == set(Strategy.model_fields)
    assert set(spec["strategy"]["properties"]["rollingUpdate"]["properties"]) == set(RollingUpdate.model_fields)
    for field in ("replicas", "minReadySeconds", "revisionHistoryLimit", "paused", "progressDeadlineSeconds"):
        assert spec[field]["default"] == FleetSpec.model_fields[field].default, field
    assert spec["strategy"]["properties"]["type"]["default"] == Strategy().type
    rolling = spec["strategy"]["properties"]["rollingUpdate"]["properties"]
    assert {k: v["default"] for k, v in rolling.items()} == RollingUpdate().model_dump()


def test_the_controller_runs_the_fleet_controller_command(rendered: list[dict]) -> None:
    deployment = of_kind(rendered, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "rayfleet-controller"
    assert container["command"][0] == "rayfleet"
    args = build_parser().parse_args(container["command"][1:])  # the CLI accepts it
    assert (args.command, args.fleet_command, args.lease_namespace) == ("fleet", "controller", "rayfleet-system")
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_the_gateway_rayservice_runs_rayfleet_with_kubernetes_discovery(rendered: list[dict]) -> None:
    service = of_kind(rendered, "RayService")[0]
    crd = rayservice_crd()
    if crd is not None:
        validate_against_crd(service, crd)
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve_apps.app:build_app"
    config = AppConfig.model_validate(app["args"])
    assert [(m.name, m.pool, m.static_endpoints) for m in config.models] == [(MODEL, None, [])]
    assert app["args"]["kubernetes_discovery"] == {"namespace": None}
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert head["spec"]["serviceAccountName"] == "rayfleet-gateway"
    (container,) = containers(head)
    assert SERVE_ENV.items() <= {e["name"]: e["value"] for e in container["env"]}.items()


def test_rbac_grants_what_the_controller_and_gateway_use(rendered: list[dict]) -> None:
    roles = {role["metadata"]["name"]: role["rules"] for role in of_kind(rendered, "ClusterRole")}

    def verbs(role: str, group: str, resource: str) -> set[str]:
        return {v for r in roles[role] if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    assert verbs("rayfleet-controller", GROUP, PLURAL) >= {"get", "list", "watch", "update", "patch"}
    assert verbs("rayfleet-controller", GROUP, f"{PLURAL}/status") >= {"update", "patch"}
    assert verbs("rayfleet-controller", "ray.io", "rayclusters") >= {"create", "delete", "watch"}
    assert verbs("rayfleet-controller", "apps", "controllerrevisions") >= {"create", "delete", "list"}
    assert verbs("rayfleet-controller", "coordination.k8s.io", "leases") >= {"get", "create", "update"}
    assert verbs("rayfleet-gateway", "", "pods") == {"get", "list", "watch"}
    bindings = {b["metadata"]["name"]: b for b in of_kind(rendered, "ClusterRoleBinding")}
    for name, binding in bindings.items():
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "rayfleet-system"}]


# --- samples and `rayfleet fleet render` --------------------------------------------------------


def test_the_sample_checks_below_have_samples_to_check() -> None:
    assert MANIFESTS / "samples" / "llama-3.1-8b-tp2.yaml" in SAMPLES


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_valid(sample: Path) -> None:
    fleet = yaml.safe_load(sample.read_text())
    validate_against_crd(fleet, fleet_crd())
    spec = FleetSpec.model_validate(fleet["spec"])
    assert spec.selector.matches(spec.template.metadata["labels"])
    validate_raycluster_spec(fleet["spec"]["template"]["spec"])


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_what_render_prints(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sample's first line is the command that made it; running it again prints the same file."""
    text = sample.read_text()
    command = shlex.split(text.splitlines()[0].removeprefix("#"))
    assert command[:3] == ["rayfleet", "fleet", "render"]
    assert render_cli(command[1:], capsys) == (0, text, "")


def test_the_sample_is_two_replicas_of_llama_on_two_gpus() -> None:
    fleet = yaml.safe_load((MANIFESTS / "samples" / "llama-3.1-8b-tp2.yaml").read_text())
    spec = fleet["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "workerGroupSpecs" not in spec["template"]["spec"]
    (head,) = containers(spec["template"]["spec"]["headGroupSpec"]["template"])
    assert head["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert f"vllm serve {MODEL} --served-model-name {MODEL} --tensor-parallel-size 2" in head["args"][0]


def test_render_follows_the_kuberay_vllm_pattern() -> None:
    """kubernetes.md §4.4: overwrite the command, start Ray in the background, wait, exec vLLM."""
    fleet = render_fleet(MODEL, tp=2, replicas=3, namespace="llm")
    spec = fleet["spec"]
    assert fleet["metadata"] == {"name": "llama-3-1-8b-instruct", "namespace": "llm",
                                 "labels": {LABEL_APP_NAME: "llama-3-1-8b-instruct"}}  # fmt: skip
    assert spec["template"]["metadata"]["annotations"] == {"ray.io/overwrite-container-cmd": "true"}
    assert not set(spec["selector"]["matchLabels"]) & set(CONTROLLER_LABELS)
    head_template = spec["template"]["spec"]["headGroupSpec"]["template"]
    (head,) = containers(head_template)
    assert head["image"] == DEFAULT_IMAGE
    assert head["command"] == ["/bin/bash", "-c"]
    script = head["args"][0].splitlines()
    assert script[0].startswith("ulimit -n")
    assert script[1] == 'eval "$KUBERAY_GEN_RAY_START_CMD" &'
    assert script[2].startswith("until ray status")
    assert script[3].startswith(f"exec vllm serve {MODEL} ")
    assert "--distributed-executor-backend ray --host 0.0.0.0 --port 8000" in script[3]
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert {"name": "http", "containerPort": 8000} in head["ports"]
    assert head_template["metadata"]["labels"] == {LABEL_MODEL: model_label(MODEL)}
    assert head_template["metadata"]["annotations"] == {
        ANNOTATION_MODEL_NAME: MODEL, "prometheus.io/scrape": "true", "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }  # fmt: skip
    validate_against_crd(fleet, fleet_crd())
    validate_raycluster_spec(spec["template"]["spec"])


def test_tp_over_several_nodes_adds_one_worker_group(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render_cli(["fleet", "render", "--model", MODEL, "--tp", "4", "--gpus-per-node", "2"], capsys)
    assert code == 0
    fleet = yaml.safe_load(out)
    cluster = fleet["spec"]["template"]["spec"]
    (head,) = containers(cluster["headGroupSpec"]["template"])
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = containers(group["template"])
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 1)
    assert head["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--tensor-parallel-size 4" in head["args"][0]
    assert worker["args"][0].splitlines()[-1] == 'eval "$KUBERAY_GEN_RAY_START_CMD"'
    assert LABEL_MODEL not in group["template"].get("metadata", {}).get("labels", {})  # workers do not serve
    validate_against_crd(fleet, fleet_crd())
    validate_raycluster_spec(cluster)


@pytest.mark.parametrize(
    ("flags", "fix"),
    [
        (["--tp", "3", "--gpus-per-node", "2"], "pick a --gpus-per-node that divides 3"),
        (["--tp", "0"], "--tp must be at least 1"),
        (["--tp", "1", "--replicas", "-1"], "--replicas must be 0 or more"),
        (["--tp", "1", "--name", "Not_DNS"], "--name 'Not_DNS' must be lowercase"),
        (["--tp", "1", "--max-surge", "0", "--max-unavailable", "0"], "cannot both be 0"),
        (["--tp", "1", "--max-surge", "lots"], "--max-surge must be a count or a percentage"),
    ],
)
def test_bad_render_input_is_one_line_with_the_fix(
    flags: list[str], fix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = render_cli(["fleet", "render", "--model", MODEL, *flags], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("rayfleet: error: ") and err.count("\n") == 1
    assert fix in err


def test_the_validator_catches_what_the_server_would_prune() -> None:
    """The offline check is strict: a typo deep in the RayCluster template is an error, not a silent drop."""
    fleet = render_fleet(MODEL, tp=1)
    containers(fleet["spec"]["template"]["spec"]["headGroupSpec"]["template"])[0]["imagePullPolicyy"] = "Always"
    fleet["spec"]["replicas"] = -1
    with pytest.raises(SchemaViolation, match=r"spec.replicas: -1 is less than the minimum of 0"):
        validate_against_crd(fleet, fleet_crd())
    if not RAYCLUSTER_CRD.is_file():
        pytest.skip("KubeRay's RayCluster CRD is in ../shared (the minimal stand-in accepts any spec)")
    with pytest.raises(SchemaViolation, match=r"containers\[0\]: Additional properties .*'imagePullPolicyy'"):
        validate_raycluster_spec(fleet["spec"]["template"]["spec"])


# --- on the test apiserver ---------------------------------------------------------------------


def kubectl_dry_run(kube: KubeTestEnv, objects: list[dict], namespace: str) -> list[dict]:
    """``kubectl apply --dry-run=server``: the server validates, defaults and prunes, and stores nothing."""
    out = subprocess.run(
        [kubectl(), "--kubeconfig", str(kube.kubeconfig_path), "apply", "--dry-run=server", "-n", namespace,
         "-o", "json", "-f", "-"],
        input=yaml.safe_dump_all(objects), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    return answer["items"] if answer.get("kind") == "List" else [answer]


@pytest.mark.k8s
def test_built_in_objects_are_accepted_by_the_apiserver(
    rendered: list[dict], fleet_crd_installed: KubeTestEnv, kube_namespace: str
) -> None:
    """Everything but the RayService (KubeRay's CRD, checked above); namespaced objects go to a test namespace."""

    def into_test_namespace(obj: dict) -> dict:
        obj = json.loads(json.dumps(obj).replace('"rayfleet-system"', json.dumps(kube_namespace)))
        return obj if obj["kind"] != "Namespace" else {**obj, "metadata": {"name": f"{kube_namespace}-x"}}

    objects = [into_test_namespace(obj) for obj in rendered if obj["kind"] != "RayService"]
    accepted = kubectl_dry_run(fleet_crd_installed, objects, kube_namespace)
    assert sorted(obj["kind"] for obj in accepted) == sorted(obj["kind"] for obj in objects)


@pytest.mark.k8s
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_stored_whole_by_the_apiserver(
    sample: Path, fleet_crd_installed: KubeTestEnv, kube_namespace: str
) -> None:
    fleet = yaml.safe_load(sample.read_text())
    (stored,) = kubectl_dry_run(fleet_crd_installed, [fleet], kube_namespace)
    assert stored["spec"] == fleet["spec"] | {"minReadySeconds": 0, "revisionHistoryLimit": 10, "paused": False}


@pytest.mark.k8s
def test_the_crd_validates_and_defaults_on_the_apiserver(fleet_crd_installed: KubeTestEnv, kube_namespace: str) -> None:
    def fleet(name: str, **spec: object) -> dict:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": spec}

    selector = {"matchLabels": {LABEL_APP_NAME: "f"}}
    template = {"metadata": {"labels": {LABEL_APP_NAME: "f"}}, "spec": {"headGroupSpec": {}}}
    with fleet_crd_installed.api_client() as api_client:
        objects = client.CustomObjectsApi(api_client)
        create = objects.create_namespaced_custom_object
        for bad, problem in [
            (fleet("negative", replicas=-1, selector=selector, template=template), "spec.replicas"),
            (fleet("no-template", selector=selector), "spec.template"),
            (fleet("bad-strategy", selector=selector, template=template, strategy={"type": "Blue"}), "strategy.type"),
        ]:
            with pytest.raises(ApiException) as rejected:
                create(*FLEET, kube_namespace, PLURAL, bad)
            assert rejected.value.status == 422 and problem in rejected.value.body

        created = create(*FLEET, kube_namespace, PLURAL, fleet("f", selector=selector, template=template))
        assert created["spec"] == {
            "replicas": 1, "selector": selector, "template": template, "strategy": {"type": "RollingUpdate"},
            "minReadySeconds": 0, "revisionHistoryLimit": 10, "paused": False, "progressDeadlineSeconds": 600,
        }  # fmt: skip
        FleetSpec.model_validate(created["spec"])

        # The scale subresource: what an autoscaler reads and writes.
        status = {"replicas": 1, "scalingTargetSelector": "rayfleet.io/fleet=f,ray.io/node-type=head"}
        objects.patch_namespaced_custom_object_status(*FLEET, kube_namespace, PLURAL, "f", {"status": status})
        scale = objects.get_namespaced_custom_object_scale(*FLEET, kube_namespace, PLURAL, "f")
        assert (scale["spec"]["replicas"], scale["status"]["selector"]) == (1, status["scalingTargetSelector"])
        objects.patch_namespaced_custom_object_scale(*FLEET, kube_namespace, PLURAL, "f", {"spec": {"replicas": 3}})
        assert objects.get_namespaced_custom_object(*FLEET, kube_namespace, PLURAL, "f")["spec"]["replicas"] == 3


def contained(ours: object, stored: object) -> bool:
    """Whether everything in ``ours`` is in ``stored``, which may hold more (the server's defaults)."""
    if isinstance(ours, dict) and isinstance(stored, dict):
        return all(key in stored and contained(value, stored[key]) for key, value in ours.items())
    if isinstance(ours, list) and isinstance(stored, list):
        return len(ours) == len(stored) and all(map(contained, ours, stored))
    return ours == stored


@pytest.mark.k8s
@pytest.mark.parametrize("gpus_per_node", [None, 1])
def test_rendered_clusters_are_stored_whole_under_kuberay_schema(
    gpus_per_node: int | None, raycluster_crd_installed: KubeTestEnv, kube_namespace: str
) -> None:
    """What the controller will create from a rendered template: nothing is pruned or rejected."""
    template = render_fleet(MODEL, tp=2, gpus_per_node=gpus_per_node)["spec"]["template"]
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "rc", **template["metadata"]},
               "spec": template["spec"]}  # fmt: skip
    with raycluster_crd_installed.api_client() as api_client:
        objects = client.CustomObjectsApi(api_client)
        stored = objects.create_namespaced_custom_object("ray.io", "v1", kube_namespace, "rayclusters", cluster,
                                                         dry_run="All")  # fmt: skip
    assert contained(template["spec"], stored["spec"])
