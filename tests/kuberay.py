"""CRD schemas for tests: KubeRay's (RayCluster, RayService) and ours (RayClusterFleet), and an
offline check of an object against a CRD's ``openAPIV3Schema`` (``kubernetes.md`` §6).

KubeRay's CRDs sit next to the repository (``../shared/data/kuberay``). Without them,
:func:`raycluster_crd` falls back to ``tests/data/raycluster-minimal-crd.yaml``, which accepts any
spec: enough for the apiserver to store RayClusters, but it checks nothing in them.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator

from tests.kube_env import _YAML_LOADER

REPO = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO.parent / "shared" / "data" / "kuberay"
RAYCLUSTER_CRD = KUBERAY_DIR / "ray.io_rayclusters.yaml"
RAYSERVICE_CRD = KUBERAY_DIR / "ray.io_rayservices.yaml"
MINIMAL_RAYCLUSTER_CRD = Path(__file__).resolve().parent / "data" / "raycluster-minimal-crd.yaml"
FLEET_CRD = REPO / "manifests" / "crd" / "orchestration.rayfleet.io_rayclusterfleets.yaml"
PRESERVE = "x-kubernetes-preserve-unknown-fields"
MAX_REPORTED_ERRORS = 10


class SchemaViolation(AssertionError):
    """An object does not fit a CRD's schema; the message lists each problem with its path."""


@cache
def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_YAML_LOADER)


def raycluster_crd() -> dict:
    """KubeRay's RayCluster CRD when ``../shared`` has it, else our minimal stand-in (a copy: yours to change)."""
    return copy.deepcopy(_load(RAYCLUSTER_CRD if RAYCLUSTER_CRD.is_file() else MINIMAL_RAYCLUSTER_CRD))


def rayservice_crd() -> dict | None:
    """KubeRay's RayService CRD, or None on a clone without ``../shared``."""
    return copy.deepcopy(_load(RAYSERVICE_CRD)) if RAYSERVICE_CRD.is_file() else None


def fleet_crd() -> dict:
    """Our RayClusterFleet CRD, as ``manifests/`` ships it."""
    return copy.deepcopy(_load(FLEET_CRD))


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 schema that jsonschema checks the way the apiserver stores objects.

    The server silently prunes fields a structural schema does not declare, so a typo never
    errors there; ``additionalProperties: false`` wherever a node lists ``properties`` and does not
    preserve unknown fields turns that typo into an error. ``metadata`` is left alone (the server
    checks it), and OpenAPI's ``nullable`` becomes a ``null`` type."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: (sub if name == "metadata" else strict_schema(sub)) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = strict_schema(value)
        elif key != "nullable":
            out[key] = value
    if "properties" in node and not node.get(PRESERVE) and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def _validator(crd: dict, version: str) -> Draft4Validator:
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return Draft4Validator(strict_schema(served["schema"]["openAPIV3Schema"]))
    raise SchemaViolation(f"CRD {crd['metadata']['name']} has no version {version!r}")


@cache
def _raycluster_validator() -> Draft4Validator:
    return _validator(raycluster_crd(), "v1")


def _check(validator: Draft4Validator, obj: dict, what: str) -> None:
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    lines = [f"  {e.json_path.removeprefix('$.') or '(root)'}: {e.message}" for e in errors[:MAX_REPORTED_ERRORS]]
    more = len(errors) - MAX_REPORTED_ERRORS
    raise SchemaViolation(
        f"{what} does not fit its schema:\n" + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
    )


def validate_against_crd(obj: dict, crd: dict) -> None:
    """Check a custom resource against the CRD version its ``apiVersion`` names; raise
    :class:`SchemaViolation` listing every problem. CEL rules are not evaluated, defaults not applied."""
    version = obj.get("apiVersion", "").rsplit("/", 1)[-1]
    name = obj.get("metadata", {}).get("name", "?")
    _check(_validator(crd, version), obj, f"{obj.get('kind', '?')} {name}")


def validate_raycluster_spec(spec: dict) -> None:
    """Check a ``RayClusterSpec`` (a fleet's ``template.spec``) against KubeRay's schema."""
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "check"}, "spec": spec}
    _check(_raycluster_validator(), cluster, "RayClusterSpec")
