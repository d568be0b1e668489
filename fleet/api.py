"""The RayClusterFleet API: names, labels and the wire models of the resource.

One fleet owns RayClusters directly, one per replica, grouped into revisions by the hash of
the template they were made from (the label ``rayfleet.io/revision-hash``). There is no
intermediate replica-set kind: see ``docs/fleet.md`` for why. Revision history (rollback by
reapplying an old template) is kept in ``apps/v1`` ControllerRevisions, as StatefulSets do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "orchestration.rayfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RayClusterFleet"
PLURAL = "rayclusterfleets"

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"

LABEL_FLEET = "rayfleet.io/fleet"  # on every cluster of a fleet and on its pod templates
LABEL_REVISION_HASH = "rayfleet.io/revision-hash"  # which template a cluster was made from
LABEL_MODEL = "rayfleet.io/model"  # on serving pods, a label-safe slug: the gateway discovers endpoints by it
ANNOTATION_MODEL_NAME = "rayfleet.io/model-name"  # the exact served model name (labels cannot hold "/")
ANNOTATION_PORT = "rayfleet.io/port"  # the serving port, when no container port is named "http"
ANNOTATION_REVISION = "rayfleet.io/revision"  # the fleet's current revision number (Deployment's)
# The replica counts a revision was last sized for: how a change of ``spec.replicas`` during a
# rollout is told apart from the rollout's own steps (Deployment's desired-/max-replicas).
ANNOTATION_DESIRED_REPLICAS = "rayfleet.io/desired-replicas"
ANNOTATION_MAX_REPLICAS = "rayfleet.io/max-replicas"
CONTROLLER_LABELS = (LABEL_FLEET, LABEL_REVISION_HASH)  # ours: ignored when templates are compared


class LabelSelectorRequirement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.matchLabels and not self.matchExpressions

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes' semantics; an empty selector matches everything (the fleet refuses it)."""
        if any(labels.get(key) != value for key, value in self.matchLabels.items()):
            return False
        for requirement in self.matchExpressions:
            present, value = requirement.key in labels, labels.get(requirement.key)
            if requirement.operator == "In" and value not in requirement.values:
                return False
            if requirement.operator == "NotIn" and present and value in requirement.values:
                return False
            if requirement.operator == "Exists" and not present:
                return False
            if requirement.operator == "DoesNotExist" and present:
                return False
        return True

    def to_query(self) -> str:
        """The ``labelSelector`` query string the API server understands."""
        parts = [f"{key}={value}" for key, value in self.matchLabels.items()]
        for r in self.matchExpressions:
            if r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values)})")
            else:
                parts.append(r.key if r.operator == "Exists" else f"!{r.key}")
        return ",".join(parts)


class RollingUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    maxSurge: int | str = "25%"
    maxUnavailable: int | str = "25%"


class Strategy(BaseModel):
    """apps/v1's DeploymentStrategy, with apps/v1's default (AIBrix has none: no rollout at all)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["RollingUpdate", "Recreate"] = "RollingUpdate"
    rollingUpdate: RollingUpdate | None = None

    def rolling(self) -> RollingUpdate:
        return self.rollingUpdate or RollingUpdate()


class ClusterTemplate(BaseModel):
    """A RayCluster to stamp out: ``metadata`` (labels, annotations) and a KubeRay ``RayClusterSpec``,
    kept as plain JSON: KubeRay's own schema validates it."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict = Field(default_factory=dict)
    spec: dict


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0)
    selector: LabelSelector
    template: ClusterTemplate
    strategy: Strategy = Field(default_factory=Strategy)
    minReadySeconds: int = Field(0, ge=0)
    revisionHistoryLimit: int = Field(10, ge=0)
    paused: bool = False
    progressDeadlineSeconds: int = Field(600, ge=1)


class Condition(BaseModel):
    """A Deployment-style condition: ``lastUpdateTime`` moves with every probe of progress,
    ``lastTransitionTime`` only when ``status`` flips."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastUpdateTime: str | None = None
    lastTransitionTime: str | None = None


class FleetStatus(BaseModel):
    observedGeneration: int = 0
    replicas: int = 0
    updatedReplicas: int = 0
    readyReplicas: int = 0
    availableReplicas: int = 0
    unavailableReplicas: int = 0
    collisionCount: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    scalingTargetSelector: str = ""

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)
