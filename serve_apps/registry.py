"""The endpoint registry: one named Ray actor that maps models to engine endpoints.

Engines register themselves when their ``/health`` answers; the registry then probes
every endpoint in the background so a dead engine turns not-ready within a couple of
seconds, whoever started it (an engine pool, a static URL, Kubernetes discovery). Gateway
replicas never call it on a request's path: each keeps a local view that long-polls
``watch`` and is replaced whenever the version moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import aiohttp
import ray

from serve_apps.endpoints import Endpoint, RegistrySnapshot

logger = logging.getLogger(__name__)

NAMESPACE = "rayfleet"
REGISTRY_NAME = "rayfleet-endpoint-registry"
LOAD_MAX_AGE_S = 5.0


class ModelLoad(NamedTuple):
    """One model's requests across the gateway replicas that report."""

    in_flight: int  # sent to an engine and not finished
    queued: int  # held by a gateway until the model has a ready engine
    reporting: int  # gateway replicas whose report is fresh


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EndpointRegistry:
    """Versioned endpoint table with long-poll watches and background health checks."""

    def __init__(self, health_interval_s: float = 2.0, unhealthy_after: int = 2) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._failures: dict[str, int] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._health_interval_s = health_interval_s
        self._unhealthy_after = unhealthy_after
        self._health_task: asyncio.Task | None = None
        # gateway replica -> (when, model -> in flight, model -> queued)
        self._loads: dict[str, tuple[float, dict[str, int], dict[str, int]]] = {}

    async def register(self, endpoint: Endpoint) -> int:
        """Add or replace an endpoint; returns the new registry version."""
        self._ensure_health_task()
        self._endpoints[endpoint.name] = endpoint
        self._failures[endpoint.name] = 0
        logger.info("registered endpoint %s (%s) for %s ready=%s", endpoint.name, endpoint.url, endpoint.model, endpoint.ready)
        return self._bump()

    async def ensure(self, endpoint: Endpoint) -> int:
        """Register ``endpoint`` unless it is already known: the engines' heartbeat.

        A restarted registry starts empty; engines call this every few seconds, so the
        table refills itself without anyone replaying history.
        """
        if endpoint.name in self._endpoints:
            return self._version
        return await self.register(endpoint)

    async def deregister(self, name: str, owner: str | None = None) -> int:
        """Remove an endpoint; with ``owner``, only while that registrant still holds it, so a
        replaced discovery replica on its way out cannot withdraw what its successor took over."""
        endpoint = self._endpoints.get(name)
        if endpoint is None or (owner is not None and endpoint.owner != owner):
            return self._version
        del self._endpoints[name]
        self._failures.pop(name, None)
        logger.info("deregistered endpoint %s", name)
        return self._bump()

    async def claim(self, name: str, owner: str) -> bool:
        """Hand an endpoint to another registrant as it is (readiness and served names kept);
        False if it is gone. Not a routing change, so no new version."""
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            return False
        self._endpoints[name] = endpoint.model_copy(update={"owner": owner})
        return True

    async def set_ready(self, name: str, ready: bool) -> int:
        """Mark an endpoint (not) ready, e.g. while it drains before a scale-down."""
        endpoint = self._endpoints.get(name)
        if endpoint is None or endpoint.ready == ready:
            return self._version
        self._endpoints[name] = endpoint.model_copy(update={"ready": ready})
        return self._bump()

    async def report_load(self, replica: str, in_flight: dict[str, int], queued: dict[str, int]) -> None:
        """A gateway replica's requests per model, sent every second (autoscaling's ``gateway``
        metric): ``in_flight`` sent to engines (queued in engines included), ``queued`` held
        in the gateway until a pool scaled to zero has an engine."""
        now = time.monotonic()
        self._loads[replica] = (now, in_flight, queued)
        # Replicas that stopped reporting (replaced, scaled down) are forgotten after a while.
        for gone in [r for r, (at, *_) in self._loads.items() if now - at > 10 * LOAD_MAX_AGE_S]:
            del self._loads[gone]

    async def model_load(self, model: str, max_age_s: float = LOAD_MAX_AGE_S) -> ModelLoad:
        """``model``'s requests over the fresh reports; a replica silent for ``max_age_s`` has
        died or stalled and no longer counts."""
        fresh_after = time.monotonic() - max_age_s
        fresh = [(in_flight, queued) for at, in_flight, queued in self._loads.values() if at >= fresh_after]
        return ModelLoad(
            in_flight=sum(in_flight.get(model, 0) for in_flight, _ in fresh),
            queued=sum(queued.get(model, 0) for _, queued in fresh),
            reporting=len(fresh),
        )

    async def snapshot(self) -> RegistrySnapshot:
        return RegistrySnapshot(version=self._version, endpoints=list(self._endpoints.values()))

    async def watch(self, known_version: int, timeout_s: float = 30.0) -> RegistrySnapshot:
        """Return as soon as the registry differs from ``known_version`` (or at the timeout)."""
        if known_version == self._version:
            try:
                await asyncio.wait_for(self._wait_for_change(known_version), timeout_s)
            except TimeoutError:
                pass
        return await self.snapshot()

    async def _wait_for_change(self, known_version: int) -> None:
        while self._version == known_version:
            await self._changed.wait()

    def _bump(self) -> int:
        self._version += 1
        # Wake every waiter, then re-arm: waiters re-check the version in their loop.
        self._changed.set()
        self._changed = asyncio.Event()
        return self._version

    def _ensure_health_task(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.5, self._health_interval_s / 2))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self._health_interval_s)
                endpoints = list(self._endpoints.values())
                results = await asyncio.gather(*(self._probe(session, e) for e in endpoints))
                for endpoint, probed in zip(endpoints, results):
                    self._apply_probe(endpoint.name, probed)

    async def _probe(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> list[str] | None:
        """The endpoint's served names if it is healthy, else None."""
        try:
            async with session.get(f"{endpoint.url}/health") as response:
                if response.status != 200:
                    return None
            async with session.get(f"{endpoint.url}/v1/models") as response:
                if response.status != 200:
                    return None
                cards = (await response.json()).get("data", [])
                return [card["id"] for card in cards if isinstance(card, dict) and "id" in card]
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    def _apply_probe(self, name: str, served: list[str] | None) -> None:
        endpoint = self._endpoints.get(name)
        if endpoint is None:  # deregistered while the probe ran
            return
        if served is None:
            self._failures[name] = self._failures.get(name, 0) + 1
            if endpoint.ready and self._failures[name] >= self._unhealthy_after:
                logger.warning("endpoint %s failed %d health checks: not ready", name, self._failures[name])
                self._endpoints[name] = endpoint.model_copy(update={"ready": False})
                self._bump()
            return
        self._failures[name] = 0
        models = sorted(set(served), key=lambda m: (m != endpoint.model, m))
        if not endpoint.ready or models != endpoint.served_names():
            self._endpoints[name] = endpoint.model_copy(update={"ready": True, "models": models})
            self._bump()


def get_registry(create: bool = True) -> ray.actor.ActorHandle:
    """The cluster's registry; created detached on first use so it outlives gateway replicas."""
    if not create:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    return EndpointRegistry.options(
        name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
