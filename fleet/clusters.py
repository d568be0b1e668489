"""How the fleet judges one RayCluster from what KubeRay writes in its status.

Pure functions over the cluster object (a plain dict), so the rollout maths and its tests
never touch the API server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fleet.api import LABEL_REVISION_HASH

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp as the API server writes it, in epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class ClusterView:
    """What the maths needs to know about one cluster.

    ``ready`` is AIBrix's (and so KubeRay users') definition: ``RayClusterProvisioned`` and
    ``HeadPodReady`` both true and every desired worker ready. ``broken``: it was provisioned
    once (KubeRay never reverts that condition) and is not ready now: the head's model server
    or a tensor-parallel worker died, and the cluster will not heal by itself.
    """

    name: str
    revision: str
    created: float
    deleting: bool
    provisioned: bool
    ready: bool
    ready_since: float | None
    deletion_cost: int = 0
    broken_since: float | None = None  # when it stopped being ready, if KubeRay's status says

    @property
    def broken(self) -> bool:
        return self.provisioned and not self.ready and not self.deleting

    def available(self, min_ready_s: int, now: float) -> bool:
        """Ready for at least ``minReadySeconds`` (Deployment's "available")."""
        if not self.ready:
            return False
        return min_ready_s == 0 or (self.ready_since is not None and self.ready_since + min_ready_s <= now)

    def available_at(self, min_ready_s: int) -> float | None:
        """When a ready cluster turns available (for a requeue), or None if not ready."""
        if not self.ready or self.ready_since is None:
            return None
        return self.ready_since + min_ready_s


def _conditions(status: dict) -> dict[str, dict]:
    return {c.get("type", ""): c for c in status.get("conditions") or [] if isinstance(c, dict)}


def view_cluster(obj: dict) -> ClusterView:
    metadata, status = obj.get("metadata") or {}, obj.get("status") or {}
    conditions = _conditions(status)
    provisioned = conditions.get("RayClusterProvisioned", {}).get("status") == "True"
    head_ready = conditions.get("HeadPodReady", {}).get("status") == "True"
    workers_ready = (status.get("readyWorkerReplicas") or 0) >= (status.get("desiredWorkerReplicas") or 0)
    ready = provisioned and head_ready and workers_ready
    since = [parse_time(conditions.get(k, {}).get("lastTransitionTime")) for k in ("RayClusterProvisioned", "HeadPodReady")]
    ready_since = max((t for t in since if t is not None), default=None) if ready else None
    head = conditions.get("HeadPodReady", {})
    # A dead head is dated by its condition; a missing worker only by the status's last update.
    broken_since = parse_time(head.get("lastTransitionTime") if not head_ready else status.get("lastUpdateTime"))
    try:
        cost = int((metadata.get("annotations") or {}).get(DELETION_COST, 0))
    except ValueError:
        cost = 0
    return ClusterView(
        name=metadata.get("name", ""),
        revision=(metadata.get("labels") or {}).get(LABEL_REVISION_HASH, ""),
        created=parse_time(metadata.get("creationTimestamp")) or 0.0,
        deleting=metadata.get("deletionTimestamp") is not None,
        provisioned=provisioned,
        ready=ready,
        ready_since=ready_since,
        deletion_cost=cost,
        broken_since=broken_since if provisioned and not ready else None,
    )


def victims(clusters: list[ClusterView], count: int, min_ready_s: int, now: float) -> list[ClusterView]:
    """Which ``count`` clusters to delete when a revision shrinks, cheapest loss first:
    not ready, then ready but not yet available, then lower deletion cost, then the most
    recently ready (ReplicaSet's order: the newest has warmed the least cache), then name."""

    def rank(c: ClusterView) -> tuple:
        return (c.ready, c.available(min_ready_s, now), c.deletion_cost, -(c.ready_since or c.created), c.name)

    return sorted(clusters, key=rank)[: max(count, 0)]
