"""The RayClusterFleet controller: keeps each fleet's RayClusters at its template and size,
rolling from one template to the next the way a Deployment does.

Level-triggered: watches on fleets and on their clusters only put the fleet's key on a work
queue; ``FleetReconciler.reconcile`` then reads the fleet, its clusters and its revision
records straight from the API server (a quorum read, so no stale cache and no
"expectations" bookkeeping), takes at most one rollout step (``fleet.rollout``) and writes
the status (``fleet.progress``). Killed at any point, the next leader reads the same world
and takes the next step. Only objects the fleet owns (controller ownerReference) are ever
changed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from fleet.api import (
    ANNOTATION_DESIRED_REPLICAS,
    ANNOTATION_MAX_REPLICAS,
    ANNOTATION_REVISION,
    GROUP,
    KIND,
    LABEL_FLEET,
    LABEL_REVISION_HASH,
    PLURAL,
    RAY_GROUP,
    RAY_PLURAL,
    RAY_VERSION,
    VERSION,
    Condition,
    FleetSpec,
    FleetStatus,
)
from fleet.clusters import ClusterView, parse_time, view_cluster, victims
from fleet.informer import Informer, Resource, new_api_client, raw_call
from fleet.leader import LeaseElector
from fleet.progress import (
    FOUND_NEW_REVISION,
    INVALID_SPEC,
    NEW_REVISION_CREATED,
    PROGRESSING,
    REPLICA_FAILURE,
    availability,
    fleet_counts,
    paused_condition,
    progress_deadline_at,
    remove_condition,
    rollout_conditions,
    set_condition,
    timestamp,
)
from fleet.revisions import (
    controller_revision,
    owned_by,
    ray_cluster,
    revision_name,
    scaling_target_selector,
    sizing_annotations,
    template_hash,
    without_controller_labels,
)
from fleet.rollout import (
    FleetState,
    Revision,
    Step,
    history_to_prune,
    is_complete,
    is_scaling_event,
    proportional_step,
    recreate_step,
    resolve_fenceposts,
    rolling_step,
)
from fleet.workqueue import WorkQueue

logger = logging.getLogger(__name__)

COMPONENT = "rayfleet-fleet-controller"


class InvalidSpec(ValueError):
    """The fleet cannot be acted on as written; the message says what to fix."""


class EventRecorder:
    """core/v1 Events on a fleet: what ``kubectl describe`` shows the user."""

    def __init__(self, api_client: Any) -> None:
        self.core = client.CoreV1Api(api_client)

    def emit(self, fleet: dict, kind: str, reason: str, message: str) -> None:
        metadata = fleet["metadata"]
        now = timestamp(time.time())
        body = {
            "metadata": {"name": f"{metadata['name']}.{secrets.token_hex(8)}", "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": metadata["name"],
                "namespace": metadata["namespace"], "uid": metadata["uid"],
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now, "source": {"component": COMPONENT},
        }  # fmt: skip
        try:
            self.core.create_namespaced_event(metadata["namespace"], body)
        except ApiException as exc:  # an event is worth a log line, never a failed reconcile
            logger.warning("event %s on %s/%s not recorded: %s", reason, metadata["namespace"], metadata["name"], exc.reason)
        logger.info("%s/%s %s: %s", metadata["namespace"], metadata["name"], reason, message)


@dataclass
class _World:
    """One reconcile's reading of the API server."""

    fleet: dict
    spec: FleetSpec
    status: FleetStatus
    clusters: list[ClusterView]
    records: dict[str, dict]  # revision hash -> ControllerRevision
    surge: int = 0  # maxSurge resolved against spec.replicas
    failures: list[Condition] = field(default_factory=list)
    recheck_at: list[float] = field(default_factory=list)  # moments a pass must look again


class FleetReconciler:
    """One pass over one fleet. ``reconcile`` returns seconds until it wants another look
    (a cluster turning available, a progress deadline), or None."""

    def __init__(self, api_client: Any, recorder: EventRecorder | None = None, broken_grace_s: float = 30.0) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.broken_grace_s = broken_grace_s
        self.apps = client.AppsV1Api(api_client)
        self.events = recorder or EventRecorder(api_client)

    # -- reading ------------------------------------------------------------------------

    def _read(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _owned(self, fleet: dict) -> tuple[list[dict], list[dict]]:
        namespace, name = fleet["metadata"]["namespace"], fleet["metadata"]["name"]
        selector = f"{LABEL_FLEET}={name}"
        clusters = self.custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, label_selector=selector
        )["items"]
        records = self.apps.api_client.sanitize_for_serialization(
            self.apps.list_namespaced_controller_revision(namespace, label_selector=selector).items
        )
        return [c for c in clusters if owned_by(c, fleet)], [r for r in records if owned_by(r, fleet)]

    @staticmethod
    def _validate(fleet: dict) -> tuple[FleetSpec, int, int]:
        try:
            spec = FleetSpec.model_validate(fleet.get("spec") or {})
        except ValidationError as exc:
            problems = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidSpec(problems) from None
        if spec.selector.is_empty():
            raise InvalidSpec("spec.selector is empty: it would select every RayCluster in the namespace")
        labels = spec.template.metadata.get("labels") or {}
        if not spec.selector.matches(labels):
            raise InvalidSpec(f"spec.selector {spec.selector.to_query()!r} does not match spec.template.metadata.labels {labels}")
        if spec.strategy.type == "RollingUpdate":
            rolling = spec.strategy.rolling()
            try:
                surge, unavailable = resolve_fenceposts(rolling.maxSurge, rolling.maxUnavailable, spec.replicas)
            except ValueError as exc:
                raise InvalidSpec(f"spec.strategy.rollingUpdate: {exc}") from None
        else:
            surge, unavailable = 0, 0
        return spec, surge, unavailable

    # -- the pass -------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> float | None:
        fleet = self._read(namespace, name)
        if fleet is None or fleet["metadata"].get("deletionTimestamp"):
            return None  # its clusters carry its ownerReference: the garbage collector removes them
        status = FleetStatus.model_validate(fleet.get("status") or {})
        now = time.time()
        try:
            spec, surge, unavailable = self._validate(fleet)
        except InvalidSpec as exc:
            self._report_invalid(fleet, status, str(exc), now)
            return None
        cluster_objects, record_objects = self._owned(fleet)
        world = _World(fleet, spec, status, [view_cluster(c) for c in cluster_objects],
                       {r["metadata"]["labels"][LABEL_REVISION_HASH]: r for r in record_objects}, surge)  # fmt: skip
        self._replace_broken(world, now)
        conditions = [c for c in status.conditions if c.reason != INVALID_SPEC]  # valid again
        new_hash, created = self._current_revision(world)
        if new_hash is None:  # a hash collision: counted in the status, tried again at once
            return 0.0
        if created is not None:
            reason = NEW_REVISION_CREATED if created else FOUND_NEW_REVISION
            if created or next((c for c in conditions if c.type == PROGRESSING), None) is None:
                message = f"{'Created' if created else 'Found'} revision {revision_name(name, new_hash)!r}"
                conditions = set_condition(conditions, Condition(type=PROGRESSING, status="True", reason=reason, message=message), now)
        state = self._state(world, new_hash, surge, unavailable, now)
        scaling_event = is_scaling_event(state)
        scaling = spec.paused or scaling_event
        if scaling:
            step = proportional_step(state, status.replicas) if scaling_event else Step()
        elif spec.strategy.type == "Recreate":
            step = recreate_step(state)
        else:
            step = rolling_step(state)
        state = self._apply(world, state, step)
        existing = {c.revision for c in world.clusters}
        if not step and is_complete(state, len(world.clusters)):
            self._prune_history(world, state, existing)
        counts = fleet_counts(state)
        conditions = availability(conditions, counts, spec.replicas, unavailable, now)
        conditions = paused_condition(conditions, spec.paused, now)
        if not scaling:
            complete = is_complete(state, state.total())
            conditions = rollout_conditions(status, conditions, counts, complete,
                                            revision_name(name, new_hash), spec.progressDeadlineSeconds, now)  # fmt: skip
        conditions = remove_condition(conditions, REPLICA_FAILURE)
        for failure in world.failures[:1]:
            conditions = set_condition(conditions, failure, now)
        self._write_status(fleet, FleetStatus(
            observedGeneration=fleet["metadata"].get("generation", 0),
            replicas=counts.replicas, updatedReplicas=counts.updated, readyReplicas=counts.ready,
            availableReplicas=counts.available, unavailableReplicas=counts.unavailable,
            collisionCount=status.collisionCount, conditions=conditions,
            scalingTargetSelector=scaling_target_selector(name),
        ))  # fmt: skip
        return self._next_look(state, conditions, spec, now, bool(step), world.recheck_at)

    # -- steps ----------------------------------------------------------------------------

    def _replace_broken(self, world: _World, now: float) -> None:
        """A cluster that broke after provisioning (its head's model server or a
        tensor-parallel worker died) and stays broken for ``broken_grace_s`` does not heal:
        delete it, so its GPUs come back, and let the step below create its replacement.
        Within the grace it stays, counted as unavailable: a readiness probe that failed
        under load must not cost a whole tensor-parallel cluster."""
        for cluster in [c for c in world.clusters if c.broken]:
            if cluster.broken_since is not None and now < cluster.broken_since + self.broken_grace_s:
                world.recheck_at.append(cluster.broken_since + self.broken_grace_s)
                continue
            if self._delete_cluster(world, cluster):
                self.events.emit(world.fleet, "Warning", "ReplacingBrokenCluster",
                                 f"RayCluster {cluster.name} is provisioned but has not been ready for "
                                 f"{self.broken_grace_s:.0f}s; deleted, a new one replaces it")  # fmt: skip

    def _current_revision(self, world: _World) -> tuple[str | None, bool | None]:
        """The hash of the revision matching the template, recording it if new (or giving an
        old one the next number: a rollback). ``created`` is True for a new record, False
        for a reused one, None when nothing changed. While paused no rollout starts, so no
        record is written."""
        fleet, status = world.fleet, world.status
        template = without_controller_labels(world.spec.template.model_dump())
        numbers = [r.get("revision", 0) for r in world.records.values()]
        latest = max(numbers, default=0)
        for revision_hash, record in world.records.items():
            if record.get("data") == template:
                if record.get("revision", 0) != latest and not world.spec.paused:
                    self._patch_record(world, revision_hash, {"revision": latest + 1})
                    self.events.emit(fleet, "Normal", "RevisionReused",
                                     f"Template matches revision {revision_name(fleet['metadata']['name'], revision_hash)!r}: rolling back to it as revision {latest + 1}")  # fmt: skip
                    self._set_fleet_revision(fleet, latest + 1)
                    return revision_hash, False
                self._set_fleet_revision(fleet, record.get("revision", 0))
                return revision_hash, None
        revision_hash = template_hash(template, status.collisionCount)
        if world.spec.paused:
            return revision_hash, None
        body = controller_revision(fleet, revision_hash, latest + 1, self._sizing(world))
        try:
            record = self._create_record(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = self.apps.api_client.sanitize_for_serialization(self.apps.read_namespaced_controller_revision(
                body["metadata"]["name"], body["metadata"]["namespace"]))  # fmt: skip
            if not (owned_by(existing, fleet) and existing.get("data") == template):
                # Someone else's object holds the name, or another template hashed the same:
                # bump and retry, as Deployment does with ``collisionCount``.
                self._write_status(fleet, status.model_copy(update={"collisionCount": status.collisionCount + 1}))
                return None, None
            record = existing  # ours, written by a pass whose reply was lost
        world.records[revision_hash] = record
        self.events.emit(fleet, "Normal", "NewRevision",
                         f"Created revision {latest + 1} ({revision_name(fleet['metadata']['name'], revision_hash)})")  # fmt: skip
        self._set_fleet_revision(fleet, latest + 1)
        return revision_hash, True

    def _create_record(self, body: dict) -> dict:
        """Create a ControllerRevision from compact JSON. Its ``data`` is kept as the bytes
        sent, and the server compacts them whenever it applies a patch: sent with spaces (as
        the typed client sends JSON), every later patch of the record's annotations would
        be refused as a change of the immutable ``data``."""
        response = raw_call(
            self.apps.api_client, "POST", f"/apis/apps/v1/namespaces/{body['metadata']['namespace']}/controllerrevisions",
            headers={"Content-Type": "application/yaml"}, body=json.dumps(body, separators=(",", ":")),  # JSON is YAML
        )  # fmt: skip
        response.read()
        return json.loads(response.data)

    @staticmethod
    def _sizing(world: _World) -> tuple[int, int]:
        """(desired, max) replicas a revision is sized for now: Deployment's annotations."""
        return world.spec.replicas, world.spec.replicas + world.surge

    def _state(self, world: _World, new_hash: str, surge: int, unavailable: int, now: float) -> FleetState:
        active: dict[str, list[ClusterView]] = {}
        for cluster in world.clusters:
            if not cluster.deleting:
                active.setdefault(cluster.revision, []).append(cluster)
        revisions: dict[str, Revision] = {}
        for revision_hash in {*world.records, *active, new_hash}:
            record = world.records.get(revision_hash)
            annotations = ((record or {}).get("metadata") or {}).get("annotations") or {}
            members = tuple(active.get(revision_hash, ()))
            created = parse_time(((record or {}).get("metadata") or {}).get("creationTimestamp"))
            revisions[revision_hash] = Revision(
                hash=revision_hash,
                number=(record or {}).get("revision", 0),
                created=created if created is not None else min((c.created for c in members), default=now),
                clusters=members,
                desired=_int(annotations.get(ANNOTATION_DESIRED_REPLICAS)),
                max_replicas=_int(annotations.get(ANNOTATION_MAX_REPLICAS)),
            )  # fmt: skip
        new = revisions.pop(new_hash)
        old_terminating = sum(1 for c in world.clusters if c.deleting and c.revision != new_hash)
        return FleetState(
            replicas=world.spec.replicas, strategy=world.spec.strategy.type, max_surge=surge, max_unavailable=unavailable,
            min_ready_s=world.spec.minReadySeconds, new=new, old=tuple(revisions.values()), now=now,
            old_terminating=old_terminating,
        )  # fmt: skip

    def _apply(self, world: _World, state: FleetState, step: Step) -> FleetState:
        """Create or delete clusters to reach the step's sizes; returns the state after it."""
        fleet = world.fleet
        by_hash = {r.hash: r for r in state.all}
        for revision_hash, target in step.sizes.items():
            revision = by_hash[revision_hash]
            if revision_hash not in world.records:
                continue  # a paused fleet's template that has no record yet: no rollout while paused
            members = list(revision.clusters)
            if target > revision.size:
                for _ in range(target - revision.size):
                    made = self._create_cluster(world, revision_hash)
                    if made is None:
                        break
                    members.append(made)
            elif target < revision.size:
                for victim in victims(members, revision.size - target, state.min_ready_s, state.now):
                    if self._delete_cluster(world, victim):
                        members.remove(victim)
            if len(members) != revision.size:
                direction = "up" if len(members) > revision.size else "down"
                self.events.emit(fleet, "Normal", "ScalingReplicaSet",
                                 f"Scaled {direction} revision {revision_name(fleet['metadata']['name'], revision_hash)} "
                                 f"from {revision.size} to {len(members)}")  # fmt: skip
            self._annotate_sizing(world, revision_hash)
            by_hash[revision_hash] = replace(revision, clusters=tuple(members))
        return replace(state, new=by_hash[state.new.hash], old=tuple(by_hash[r.hash] for r in state.old))

    def _create_cluster(self, world: _World, revision_hash: str) -> ClusterView | None:
        body = ray_cluster(world.fleet, revision_hash)
        try:
            made = self.custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, world.fleet["metadata"]["namespace"], RAY_PLURAL, body
            )
        except ApiException as exc:
            message = f"creating a RayCluster failed: {exc.status} {_api_message(exc)}"
            world.failures.append(Condition(type=REPLICA_FAILURE, status="True", reason="FailedCreate", message=message))
            self.events.emit(world.fleet, "Warning", "FailedCreate", message)
            return None
        cluster = view_cluster(made)
        world.clusters.append(cluster)
        return cluster

    def _delete_cluster(self, world: _World, cluster: ClusterView) -> bool:
        namespace = world.fleet["metadata"]["namespace"]
        try:
            self.custom.delete_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, cluster.name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:  # already gone: what we wanted
                world.clusters = [c for c in world.clusters if c.name != cluster.name]
                return True
            message = f"deleting RayCluster {cluster.name} failed: {exc.status} {_api_message(exc)}"
            world.failures.append(Condition(type=REPLICA_FAILURE, status="True", reason="FailedDelete", message=message))
            self.events.emit(world.fleet, "Warning", "FailedDelete", message)
            return False
        world.clusters = [replace(c, deleting=True) if c.name == cluster.name else c for c in world.clusters]
        return True

    def _annotate_sizing(self, world: _World, revision_hash: str) -> None:
        wanted = sizing_annotations(*self._sizing(world))
        record = world.records[revision_hash]
        current = (record.get("metadata") or {}).get("annotations") or {}
        if any(current.get(k) != v for k, v in wanted.items()):
            self._patch_record(world, revision_hash, {"metadata": {"annotations": wanted}})

    def _patch_record(self, world: _World, revision_hash: str, patch: dict) -> None:
        record = world.records[revision_hash]
        patched = self.apps.patch_namespaced_controller_revision(
            record["metadata"]["name"], record["metadata"]["namespace"], patch
        )
        world.records[revision_hash] = self.apps.api_client.sanitize_for_serialization(patched)

    def _prune_history(self, world: _World, state: FleetState, existing: set[str]) -> None:
        for revision in history_to_prune(state.old, world.spec.revisionHistoryLimit, existing):
            record = world.records.pop(revision.hash, None)
            if record is None:
                continue
            try:
                self.apps.delete_namespaced_controller_revision(record["metadata"]["name"], record["metadata"]["namespace"])
            except ApiException as exc:
                if exc.status != 404:
                    raise

    # -- writing status -------------------------------------------------------------------

    def _set_fleet_revision(self, fleet: dict, number: int) -> None:
        annotations = fleet["metadata"].get("annotations") or {}
        if annotations.get(ANNOTATION_REVISION) == str(number):
            return
        patch = {"metadata": {"annotations": {ANNOTATION_REVISION: str(number)}}}
        updated = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, fleet["metadata"]["namespace"], PLURAL, fleet["metadata"]["name"], patch
        )
        fleet["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"]
        fleet["metadata"]["annotations"] = updated["metadata"].get("annotations") or {}

    def _write_status(self, fleet: dict, status: FleetStatus) -> None:
        """Replace the status only if it changed, at the resourceVersion read: a 409 means the
        fleet moved under us, and the work queue retries the whole pass with backoff."""
        if status == FleetStatus.model_validate(fleet.get("status") or {}):
            return
        body = {**fleet, "status": status.model_dump(exclude_none=True)}
        updated = self.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, fleet["metadata"]["namespace"], PLURAL, fleet["metadata"]["name"], body
        )
        fleet["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"]
        fleet["status"] = updated.get("status") or {}

    def _report_invalid(self, fleet: dict, status: FleetStatus, message: str, now: float) -> None:
        """``Progressing=False/InvalidSpec`` with what to fix, and a Warning event when the
        problem is new. Nothing is created or deleted for a fleet that cannot be read right."""
        previous = status.condition(PROGRESSING)
        conditions = status.conditions
        if previous is None or previous.reason != INVALID_SPEC or previous.message != message:
            self.events.emit(fleet, "Warning", INVALID_SPEC, message)
            stamp = timestamp(now)
            since = previous.lastTransitionTime if previous is not None and previous.status == "False" else stamp
            invalid = Condition(type=PROGRESSING, status="False", reason=INVALID_SPEC, message=message,
                                lastUpdateTime=stamp, lastTransitionTime=since)  # fmt: skip
            conditions = remove_condition(conditions, PROGRESSING) + [invalid]
        self._write_status(fleet, status.model_copy(update={
            "observedGeneration": fleet["metadata"].get("generation", 0), "conditions": conditions}))  # fmt: skip

    @staticmethod
    def _next_look(
        state: FleetState, conditions: list[Condition], spec: FleetSpec, now: float, stepped: bool, recheck_at: list[float]
    ) -> float | None:
        """Nothing in the API changes when a cluster's minReadySeconds pass, a broken cluster's
        grace ends or a deadline lapses, so the controller sets itself a reminder for the
        earliest of them."""
        if stepped:
            return None  # our own writes come back as watch events
        moments: list[float | None] = [c.available_at(spec.minReadySeconds) for r in state.all for c in r.clusters
                                       if c.ready and not c.available(spec.minReadySeconds, now)]  # fmt: skip
        moments += recheck_at
        if not spec.paused:
            moments.append(progress_deadline_at(conditions, spec.progressDeadlineSeconds))
        due = [m for m in moments if m is not None]
        return max(min(due) - now, 0.0) + 0.05 if due else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message", exc.reason or "")
    except ValueError:
        return exc.reason or ""


class FleetController:
    """Watches fleets and their clusters, and reconciles each fleet whose key comes up.

    Watch events (and every relist) only queue the fleet's key: the reconcile reads the rest.
    A failed pass is retried with per-key exponential backoff; a pass that asks for another
    look (``minReadySeconds``, a progress deadline) is queued for then.
    """

    def __init__(self, api_client: Any, namespace: str | None = None, workers: int = 2, broken_grace_s: float = 30.0) -> None:
        self.reconciler = FleetReconciler(api_client, broken_grace_s=broken_grace_s)
        self.queue = WorkQueue()
        self.workers = workers
        self.informers = [
            Informer(api_client, Resource(GROUP, VERSION, PLURAL, namespace),
                     on_event=lambda _type, obj: self._enqueue(obj), on_relist=self._enqueue_all),
            Informer(api_client, Resource(RAY_GROUP, RAY_VERSION, RAY_PLURAL, namespace, label_selector=LABEL_FLEET),
                     on_event=lambda _type, obj: self._enqueue_owner(obj),
                     on_relist=lambda objects: [self._enqueue_owner(o) for o in objects]),
        ]  # fmt: skip
        self._threads: list[threading.Thread] = []

    def _enqueue(self, fleet: dict) -> None:
        self.queue.add(f"{fleet['metadata']['namespace']}/{fleet['metadata']['name']}")

    def _enqueue_all(self, fleets: list[dict]) -> None:
        for fleet in fleets:
            self._enqueue(fleet)

    def _enqueue_owner(self, cluster: dict) -> None:
        metadata = cluster["metadata"]
        owner = (metadata.get("labels") or {}).get(LABEL_FLEET)
        if owner:
            self.queue.add(f"{metadata['namespace']}/{owner}")

    def start(self) -> None:
        for informer in self.informers:
            informer.start()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"fleet worker {index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.queue.close()
        for informer in self.informers:
            informer.stop()
        for thread in self._threads:
            thread.join(30)

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            namespace, name = key.split("/", 1)
            try:
                again = self.reconciler.reconcile(namespace, name)
            except ApiException as exc:
                level = logging.INFO if exc.status == 409 else logging.WARNING  # conflicts are routine
                logger.log(level, "reconciling fleet %s: %s %s; retrying", key, exc.status, _api_message(exc))
                self.queue.add_rate_limited(key)
            except Exception:  # a bug must not stop the other fleets
                logger.exception("reconciling fleet %s failed; retrying", key)
                self.queue.add_rate_limited(key)
            else:
                self.queue.forget(key)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self.queue.done(key)


def run_controller(
    namespace: str | None = None,
    lease_namespace: str = "rayfleet-system",
    lease_name: str = "rayfleet-fleet-controller",
    identity: str | None = None,
    kubeconfig: str | None = None,
    lease_duration_s: float = 15.0,
    renew_deadline_s: float = 10.0,
    retry_period_s: float = 2.0,
    broken_grace_s: float = 30.0,
) -> int:
    """``rayfleet fleet controller``: wait for the lease, run the controller while holding it.
    Returns 0 after SIGTERM/SIGINT (lease released at once) and 1 when the lease was lost:
    the pod restarts and competes again, as client-go controllers do."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_client = new_api_client(kubeconfig)
    identity = identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = LeaseElector(api_client, lease_namespace, lease_name, identity,
                           lease_duration_s, renew_deadline_s, retry_period_s)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if not elector.acquire(stop):
        return 0
    controller = FleetController(api_client, namespace, broken_grace_s=broken_grace_s)
    controller.start()
    elector.hold(stop)
    controller.stop()
    return 0 if stop.is_set() else 1
