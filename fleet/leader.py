"""Leader election on a ``coordination.k8s.io/v1`` Lease, client-go's algorithm.

Several controller replicas run; the one holding the Lease acts, the others wait. A holder
renews every ``retry_period_s``; a candidate takes over only after it has watched the same
record stay unchanged for ``lease_duration_s`` on its own clock, so clock skew between
nodes cannot cause two leaders. A leader that cannot renew within ``renew_deadline_s``
stops acting before anyone else may start.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class LeaseElector:
    def __init__(
        self, api_client: Any, namespace: str, name: str, identity: str,
        lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
    ) -> None:  # fmt: skip
        if not retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("leader election needs retry period < renew deadline < lease duration")
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = lease_duration_s, renew_deadline_s, retry_period_s
        self._observed: tuple | None = None  # the other holder's record as last seen
        self._observed_at = 0.0  # monotonic time it was first seen unchanged

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this instance leads (True) or ``stop`` is set (False)."""
        logged = False
        while not stop.is_set():
            if self._try_acquire_or_renew():
                logger.info("%s became the leader (lease %s/%s)", self.identity, self.namespace, self.name)
                return True
            if not logged:
                logger.info("%s waits for lease %s/%s", self.identity, self.namespace, self.name)
                logged = True
            stop.wait(self.retry_period_s)
        return False

    def hold(self, stop: threading.Event) -> None:
        """Renew until ``stop`` is set (then release the lease) or renewal fails for
        ``renew_deadline_s`` (then return without releasing: leadership is lost)."""
        last_renewed = time.monotonic()
        while not stop.wait(self.retry_period_s):
            if self._try_acquire_or_renew():
                last_renewed = time.monotonic()
            elif time.monotonic() - last_renewed > self.renew_deadline_s:
                logger.error("%s lost lease %s/%s", self.identity, self.namespace, self.name)
                return
        self.release()

    def release(self) -> None:
        """Hand over at once on a clean shutdown (client-go's ReleaseOnCancel)."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.lease_duration_seconds = 1
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            logger.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc.reason)

    def _try_acquire_or_renew(self) -> bool:
        now = _now()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                logger.warning("reading lease %s/%s failed: %s", self.namespace, self.name, exc.reason)
                return False
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity, lease_duration_seconds=round(self.lease_duration_s),
                    acquire_time=now, renew_time=now, lease_transitions=0,
                ),
            )  # fmt: skip
            return self._write(lambda: self.api.create_namespaced_lease(self.namespace, body))
        spec = lease.spec
        holder = spec.holder_identity or ""
        record = (holder, spec.renew_time, spec.lease_duration_seconds, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = spec.lease_duration_seconds or self.lease_duration_s
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False  # someone else holds a lease that has not lapsed on our clock
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = round(self.lease_duration_s)
        return self._write(lambda: self.api.replace_namespaced_lease(self.name, self.namespace, lease))

    def _write(self, call: Any) -> bool:
        try:
            lease = call()
        except ApiException as exc:  # 409: someone else wrote first; try again next period
            if exc.status not in (409, 422):
                logger.warning("writing lease %s/%s failed: %s", self.namespace, self.name, exc.reason)
            return False
        spec = lease.spec
        self._observed = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds, spec.lease_transitions)
        self._observed_at = time.monotonic()
        return True
