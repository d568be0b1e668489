"""Revisions of a fleet's template: their hash, their record, and the clusters made from them.

A revision is identified by a hash of the template, as a Deployment's ReplicaSets are by
``pod-template-hash``. Go's hash (FNV-32a over ``dump.ForHash``) cannot be reproduced in
Python, so ours is FNV-32a over canonical JSON, with the same collision bump and the same
"safe" alphabet, so names look like the ones Kubernetes users know.

The record of a revision is an ``apps/v1`` ControllerRevision (``<fleet>-<hash>``) holding
the template, the revision number and the replica counts it was last sized for: that is
the fleet's history, and rollback is reapplying an old template.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fleet.api import (
    ANNOTATION_DESIRED_REPLICAS,
    ANNOTATION_MAX_REPLICAS,
    API_VERSION,
    CONTROLLER_LABELS,
    KIND,
    LABEL_FLEET,
    LABEL_REVISION_HASH,
    RAY_GROUP,
    RAY_VERSION,
)

SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _fnv32a(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def _safe_encode(value: int) -> str:
    """Kubernetes' ``rand.SafeEncodeString`` of the decimal digits: no vowels, no look-alikes."""
    return "".join(SAFE_ALPHABET[int(digit) % len(SAFE_ALPHABET)] for digit in str(value))


def _pod_templates(spec: dict) -> list[dict]:
    """The head's and every worker group's pod template (each a dict, created if missing)."""
    templates = [spec.setdefault("headGroupSpec", {}).setdefault("template", {})]
    for group in spec.get("workerGroupSpecs") or []:
        templates.append(group.setdefault("template", {}))
    return templates


def without_controller_labels(template: dict) -> dict:
    """The template as the user wrote it: our labels removed at every level we add them."""
    clean = copy.deepcopy(template)
    holders = [clean.setdefault("metadata", {})]
    holders += [t.setdefault("metadata", {}) for t in _pod_templates(clean.setdefault("spec", {}))]
    for metadata in holders:
        labels = metadata.get("labels") or {}
        for key in CONTROLLER_LABELS:
            labels.pop(key, None)
        if labels:
            metadata["labels"] = labels
        else:
            metadata.pop("labels", None)
    return clean


def template_hash(template: dict, collision_count: int = 0) -> str:
    canonical = json.dumps(without_controller_labels(template), sort_keys=True, separators=(",", ":"))
    data = canonical.encode()
    if collision_count:
        data += collision_count.to_bytes(4, "little")
    return _safe_encode(_fnv32a(data))


def revision_name(fleet_name: str, revision_hash: str) -> str:
    return f"{fleet_name}-{revision_hash}"


def owner_reference(fleet: dict) -> dict[str, Any]:
    metadata = fleet["metadata"]
    return {
        "apiVersion": API_VERSION, "kind": KIND, "name": metadata["name"], "uid": metadata["uid"],
        "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip


def owned_by(obj: dict, fleet: dict) -> bool:
    uid = fleet["metadata"]["uid"]
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == uid for ref in refs)


def controller_revision(fleet: dict, revision_hash: str, number: int, sizes: tuple[int, int]) -> dict:
    """The ControllerRevision recording ``revision_hash``: template, number and the
    (desired, max) replicas it was sized for."""
    name = fleet["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": revision_name(name, revision_hash),
            "namespace": fleet["metadata"]["namespace"],
            "labels": {LABEL_FLEET: name, LABEL_REVISION_HASH: revision_hash},
            "annotations": sizing_annotations(*sizes),
            "ownerReferences": [owner_reference(fleet)],
        },
        "data": without_controller_labels(fleet["spec"]["template"]),
        "revision": number,
    }


def sizing_annotations(desired: int, maximum: int) -> dict[str, str]:
    return {ANNOTATION_DESIRED_REPLICAS: str(desired), ANNOTATION_MAX_REPLICAS: str(maximum)}


def ray_cluster(fleet: dict, revision_hash: str) -> dict:
    """A RayCluster of ``revision_hash``: the template with the fleet's and the revision's
    labels on the cluster and on every pod template (the fleet's ``scale`` selector picks
    the head pods by them), owned by the fleet so deleting the fleet deletes it."""
    name = fleet["metadata"]["name"]
    template = copy.deepcopy(fleet["spec"]["template"])
    ours = {LABEL_FLEET: name, LABEL_REVISION_HASH: revision_hash}
    metadata = template.get("metadata") or {}
    spec = template.get("spec") or {}
    for pod_template in _pod_templates(spec):
        pod_metadata = pod_template.setdefault("metadata", {})
        pod_metadata["labels"] = {**(pod_metadata.get("labels") or {}), **ours}
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayCluster",
        "metadata": {
            "generateName": f"{revision_name(name, revision_hash)}-",
            "namespace": fleet["metadata"]["namespace"],
            "labels": {**(metadata.get("labels") or {}), **ours},
            "annotations": dict(metadata.get("annotations") or {}),
            "ownerReferences": [owner_reference(fleet)],
        },
        "spec": spec,
    }


def scaling_target_selector(fleet_name: str) -> str:
    """The fleet's ``/scale`` selector: its clusters' head pods, where the model serves."""
    return f"{LABEL_FLEET}={fleet_name},ray.io/node-type=head"
