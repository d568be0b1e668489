"""The RayClusterFleet manifest that serves one model with ``vllm serve`` on a Ray cluster.

Each of the fleet's RayClusters is one model replica: vLLM runs on the head with
``--distributed-executor-backend ray`` and spreads its tensor-parallel ranks over the head's
GPUs and, when one node is not enough, over worker nodes. The container commands follow
``kubernetes.md`` §4.4: KubeRay always starts Ray with ``--block``, so the template sets
``ray.io/overwrite-container-cmd`` and runs KubeRay's generated start line
(``$KUBERAY_GEN_RAY_START_CMD``) itself, in the background on the head, before ``vllm serve``.

Pure: it builds a dict and raises :class:`RenderError` on bad input; ``rayfleet fleet render``
prints it, and ``manifests/samples/`` holds what it prints for one model.
"""

from __future__ import annotations

import re
import shlex

import yaml

from fleet.api import ANNOTATION_MODEL_NAME, API_VERSION, KIND, LABEL_MODEL

DEFAULT_IMAGE = "vllm/vllm-openai:v0.11.0"  # vLLM's OpenAI server image; it ships Ray
SERVE_PORT = 8000
GCS_PORT = 6379
RAY_PORTS = {"gcs-server": GCS_PORT, "dashboard": 8265, "client": 10001, "metrics": 8080}  # KubeRay's defaults
DASHBOARD_AGENT_PORT = 52365  # KubeRay's default; its raylet health check is what KubeRay's own probes ask
# A fleet's clusters are named ``<fleet>-<hash>-<5 chars>`` and their head Services
# ``<cluster>-head-svc``; 40 characters keep those within the 63 of a DNS label.
NAME_MAX = 40
# The selector's key; ``rayfleet.io/fleet`` and ``rayfleet.io/revision-hash`` are the controller's to set.
LABEL_APP_NAME = "app.kubernetes.io/name"
ANNOTATION_OVERWRITE_CMD = "ray.io/overwrite-container-cmd"
WORKER_GROUP = "gpu-workers"
# Downloading and loading weights takes longer than a Deployment's 10 minutes on a cold node.
PROGRESS_DEADLINE_S = 1800
CPUS_PER_GPU = 4
MEMORY_GI_PER_GPU = 16
HF_TOKEN_SECRET = "hf-token"  # optional Secret (key ``token``) for gated models such as Llama

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_INT_OR_PERCENT = re.compile(r"\d+%?")


class RenderError(ValueError):
    """Input the manifest cannot be built from; the message is one line that says the fix."""


def name_for_model(model: str) -> str:
    """A DNS-label fleet name from the model's last path segment: ``meta-llama/Llama-3.1-8B-Instruct``
    becomes ``llama-3-1-8b-instruct``."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower())[:NAME_MAX].strip("-")
    if not slug:
        raise RenderError(f"cannot derive a fleet name from model {model!r}: pass --name")
    return slug


def model_label(model: str) -> str:
    """The ``rayfleet.io/model`` label value for a model: its name with every character a label
    value cannot hold (``/`` among them) replaced by ``-``, at most 63 characters. The exact name
    travels in the ``rayfleet.io/model-name`` annotation."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", model)[:63].strip("-_.")
    if not value:
        raise RenderError(f"model {model!r} has no character a label can hold: pass a real model name")
    return value


def parse_int_or_percent(value: str | int, flag: str) -> int | str:
    """``"1"`` → 1, ``"25%"`` → ``"25%"``: a Deployment's int-or-string ``maxSurge``/``maxUnavailable``."""
    text = str(value).strip()
    if not _INT_OR_PERCENT.fullmatch(text):
        raise RenderError(f"{flag} must be a count or a percentage such as 1 or 25%, not {value!r}")
    return text if text.endswith("%") else int(text)


def _is_zero(value: int | str) -> bool:
    return int(str(value).rstrip("%")) == 0


def _check(model: str, tp: int, replicas: int, gpus_per_node: int, name: str, namespace: str | None) -> None:
    if not model.strip():
        raise RenderError("--model is empty: pass the model to serve, e.g. meta-llama/Llama-3.1-8B-Instruct")
    if tp < 1:
        raise RenderError(f"--tp must be at least 1, not {tp}")
    if replicas < 0:
        raise RenderError(f"--replicas must be 0 or more, not {replicas}")
    if gpus_per_node < 1:
        raise RenderError(f"--gpus-per-node must be at least 1, not {gpus_per_node}")
    if gpus_per_node < tp and tp % gpus_per_node:
        raise RenderError(
            f"--tp {tp} is not a multiple of --gpus-per-node {gpus_per_node}: every node must hold the same "
            f"number of tensor-parallel ranks, so pick a --gpus-per-node that divides {tp}"
        )
    if len(name) > NAME_MAX or not _DNS_LABEL.fullmatch(name):
        raise RenderError(f"--name {name!r} must be lowercase letters, digits and '-', at most {NAME_MAX} characters")
    if namespace is not None and (len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace)):
        raise RenderError(f"--namespace {namespace!r} is not a valid namespace name (lowercase letters, digits, '-')")


def _resources(gpus: int) -> dict:
    return {
        "requests": {"cpu": str(CPUS_PER_GPU * gpus), "memory": f"{MEMORY_GI_PER_GPU * gpus}Gi"},
        "limits": {"memory": f"{MEMORY_GI_PER_GPU * gpus}Gi", "nvidia.com/gpu": gpus},
    }


def _pod_spec(container: dict) -> dict:
    """A Ray node's pod: one container, a memory-backed ``/dev/shm`` for NCCL between local GPUs,
    and the optional Hugging Face token gated models need."""
    container = {
        **container,
        "env": [
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token", "optional": True}},
            }
        ],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {"containers": [container], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}


def _raylet_probe() -> dict:
    """Ray's own health as an HTTP probe. A container with no probe gets KubeRay's, which run ``wget``,
    and an image without ``wget`` would then fail them forever; so every container here brings its own."""
    return {
        "httpGet": {"path": "/api/local_raylet_healthz", "port": DASHBOARD_AGENT_PORT},
        "initialDelaySeconds": 30,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 6,
    }


def _head_script(model: str, tp: int) -> str:
    """Ray in the background, then vLLM in the foreground once Ray answers: vLLM's exit ends the pod."""
    serve = shlex.join([
        "vllm", "serve", model, "--served-model-name", model, "--tensor-parallel-size", str(tp),
        "--distributed-executor-backend", "ray", "--host", "0.0.0.0", "--port", str(SERVE_PORT),
    ])  # fmt: skip
    return "\n".join([
        "ulimit -n 65536",
        'eval "$KUBERAY_GEN_RAY_START_CMD" &',
        f"until ray status --address=127.0.0.1:{GCS_PORT} >/dev/null 2>&1; do sleep 2; done",
        f"exec {serve}",
    ])  # fmt: skip


def _head_group(model: str, tp: int, gpus: int, image: str) -> dict:
    container = {
        "name": "ray-head",
        "image": image,
        "command": ["/bin/bash", "-c"],
        "args": [_head_script(model, tp)],
        "ports": [{"name": "http", "containerPort": SERVE_PORT}]
        + [{"name": port_name, "containerPort": port} for port_name, port in RAY_PORTS.items()],
        # Ready means the model answers, so the cluster's HeadPodReady means "serving" (§4.4).
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": SERVE_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": _raylet_probe(),  # Ray's health: a long model load must not restart the pod
        "resources": _resources(gpus),
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {
                "labels": {LABEL_MODEL: model_label(model)},
                "annotations": {
                    ANNOTATION_MODEL_NAME: model,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(SERVE_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": _pod_spec(container),
        },
    }


def _worker_group(workers: int, gpus: int, image: str) -> dict:
    container = {
        "name": "ray-worker",
        "image": image,
        "command": ["/bin/bash", "-c"],
        "args": ['ulimit -n 65536\neval "$KUBERAY_GEN_RAY_START_CMD"'],
        "readinessProbe": _raylet_probe(),
        "livenessProbe": _raylet_probe(),
        "resources": _resources(gpus),
    }
    return {
        "groupName": WORKER_GROUP,
        "replicas": workers,
        "minReplicas": workers,
        "maxReplicas": workers,
        "rayStartParams": {},
        "template": {"spec": _pod_spec(container)},
    }


def render_fleet(
    model: str,
    tp: int,
    replicas: int = 1,
    name: str | None = None,
    namespace: str | None = None,
    image: str = DEFAULT_IMAGE,
    gpus_per_node: int | None = None,
    max_surge: int | str = 1,
    max_unavailable: int | str = 0,
) -> dict:
    """A RayClusterFleet of ``replicas`` clusters, each serving ``model`` with tensor parallelism ``tp``
    over ``tp / gpus_per_node`` nodes (default: one node with all ``tp`` GPUs).

    The default rollout, one extra cluster and none taken away, never lowers serving capacity."""
    name = name if name is not None else name_for_model(model)
    per_node = min(gpus_per_node if gpus_per_node is not None else tp, tp)
    _check(model, tp, replicas, per_node, name, namespace)
    surge = parse_int_or_percent(max_surge, "--max-surge")
    unavailable = parse_int_or_percent(max_unavailable, "--max-unavailable")
    if _is_zero(surge) and _is_zero(unavailable):
        raise RenderError("--max-surge and --max-unavailable cannot both be 0: the rollout could never progress")
    cluster_spec: dict = {"headGroupSpec": _head_group(model, tp, per_node, image)}
    if tp > per_node:
        cluster_spec["workerGroupSpecs"] = [_worker_group(tp // per_node - 1, per_node, image)]
    metadata: dict = {"name": name, "labels": {LABEL_APP_NAME: name}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {LABEL_APP_NAME: name}},
            "template": {
                "metadata": {
                    "labels": {LABEL_APP_NAME: name},
                    "annotations": {ANNOTATION_OVERWRITE_CMD: "true"},
                },
                "spec": cluster_spec,
            },
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the container scripts) as ``|`` blocks, so the manifest reads like a script."""


_BlockDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def to_yaml(manifest: dict) -> str:
    """The manifest as YAML, keys in the order they were built (apiVersion, kind, metadata, spec)."""
    return yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=120)
