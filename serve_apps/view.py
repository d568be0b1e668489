"""A gateway replica's local copy of the endpoint registry.

Requests read it synchronously (a dict lookup); a background task long-polls the
registry actor and swaps in each new version. Per-endpoint load counters live here too and
survive those swaps, because the registry knows nothing about this replica's traffic.
"""

from __future__ import annotations

import asyncio
import logging


from serve_apps.endpoints import RegistrySnapshot
from serve_apps.routing import EndpointState

logger = logging.getLogger(__name__)


class EndpointView:
    """Model name -> endpoint states, rebuilt from registry snapshots."""

    def __init__(self) -> None:
        self.version = -1
        self._states: dict[str, EndpointState] = {}
        self._all: dict[str, list[EndpointState]] = {}
        self._ready: dict[str, list[EndpointState]] = {}
        self._adapters: set[str] = set()
        self._applied = asyncio.Event()  # set and replaced on every apply: wakes wait_ready
        self._waiting: dict[str, int] = {}

    def apply(self, snapshot: RegistrySnapshot) -> None:
        """Replace the view with ``snapshot``, keeping the live counters of known endpoints."""
        states: dict[str, EndpointState] = {}
        by_model: dict[str, list[EndpointState]] = {}
        adapters: set[str] = set()
        for endpoint in snapshot.endpoints:
            state = self._states.get(endpoint.name)
            if state is None or state.url != endpoint.url:
                state = EndpointState(name=endpoint.name, url=endpoint.url)
            state.ready = endpoint.ready
            state.labels = endpoint.labels
            states[endpoint.name] = state
            for model in endpoint.served_names():
                by_model.setdefault(model, []).append(state)
            adapters.update(name for name in endpoint.served_names() if name != endpoint.model)
        self._states = states
        self._adapters = adapters
        self._all = by_model
        self._ready = {model: [s for s in group if s.ready] for model, group in by_model.items()}
        self.version = snapshot.version
        self._applied.set()
        self._applied = asyncio.Event()

    def knows(self, model: str) -> bool:
        return model in self._all

    def is_adapter(self, model: str) -> bool:
        """Whether ``model`` is a LoRA adapter an endpoint serves on top of its base model."""
        return model in self._adapters

    def ready_endpoints(self, model: str) -> list[EndpointState]:
        return self._ready.get(model, [])

    async def wait_ready(self, model: str, timeout_s: float) -> list[EndpointState]:
        """Wait until ``model`` has a ready endpoint (empty list at the timeout), counted as
        waiting meanwhile: Knative's activator, for a pool scaled to zero whose autoscaler
        starts an engine when the gateway reports requests waiting for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._waiting[model] = self._waiting.get(model, 0) + 1
        try:
            while not (ready := self.ready_endpoints(model)):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._applied.wait(), remaining)
                except TimeoutError:
                    break
            return ready
        finally:
            self._waiting[model] -= 1
            if not self._waiting[model]:
                del self._waiting[model]

    def waiting_by_model(self) -> dict[str, int]:
        """Requests this replica holds until their model has a ready endpoint."""
        return dict(self._waiting)

    def models(self) -> list[str]:
        """Models with at least one ready endpoint, in name order."""
        return sorted(model for model, group in self._ready.items() if group)

    def endpoints(self) -> list[EndpointState]:
        return list(self._states.values())

    def in_flight_by_model(self) -> dict[str, int]:
        """Requests this replica has in flight, per model (an endpoint serving several models,
        adapters included, counts towards each)."""
        return {model: sum(state.in_flight for state in group) for model, group in self._all.items()}

    async def follow(self, registry_getter, poll_timeout_s: float = 30.0) -> None:
        """Track the registry forever; survive its restarts by re-resolving the handle."""
        registry = None
        while True:
            try:
                if registry is None:
                    registry = registry_getter()
                snapshot = await registry.watch.remote(self.version, poll_timeout_s)
                self.apply(snapshot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry restarting or not created yet
                logger.warning("endpoint registry unavailable (%s); retrying", exc)
                registry = None
                await asyncio.sleep(1.0)
