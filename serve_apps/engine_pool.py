"""Engine pools: engines as Ray actors, kept running and registered by a reconcile loop.

``EngineActor`` owns one engine process (``engines.launcher.EngineProcess``) and registers
it. ``EngineManager`` is a one-replica Serve deployment that owns every pool's actors:
they share its fate, so deleting the application (or ``rayfleet down``) takes the engines
with it, and a restarted manager starts them again. It also registers static endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import re

import ray
from ray import serve

from engines.config import EngineConfig, EngineKind
from engines.launcher import EngineProcess
from serve_apps.config import AppConfig, ModelConfig
from serve_apps.endpoints import (
    LABEL_KV_EVENTS,
    LABEL_KV_EVENTS_REPLAY,
    LABEL_KV_EVENTS_TOPIC,
    Endpoint,
)
from serve_apps.registry import get_registry

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
RECONCILE_S = 5.0


@ray.remote(num_cpus=0, max_restarts=-1)
class EngineActor:
    """One engine endpoint: the process, its registration and a registry heartbeat."""

    def __init__(self, name: str, model: str, config: EngineConfig, kind: EngineKind, labels: dict[str, str]) -> None:
        self.process = EngineProcess(name, config, kind)
        events = self.process.kv_event_endpoints()
        if events is not None:  # where the KV index's subscriber finds this engine's events
            publish, replay = events
            topic = (self.process.config.kv_events_config or {}).get("topic", "")
            labels = {**labels, LABEL_KV_EVENTS: publish, LABEL_KV_EVENTS_TOPIC: topic}
            if replay is not None:
                labels[LABEL_KV_EVENTS_REPLAY] = replay
        self.endpoint = Endpoint(
            name=name, url=self.process.url, model=model, models=[model], ready=True, labels=labels, source="pool"
        )
        self.registry = get_registry()
        self._heartbeat: asyncio.Task | None = None
        self._start_lock = asyncio.Lock()

    async def ensure_running(self) -> Endpoint:
        """Start the engine if it is not running, then (re-)register it. Idempotent."""
        async with self._start_lock:
            if not self.process.alive():
                await self.process.start()
                await self.registry.register.remote(self.endpoint)
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        return self.endpoint

    async def _heartbeat_loop(self) -> None:
        while self.process.alive():
            try:
                await self.registry.ensure.remote(self.endpoint)
            except ray.exceptions.RayActorError:
                self.registry = get_registry()
            await asyncio.sleep(HEARTBEAT_S)
        logger.warning("engine %s exited (%s); marking it not ready", self.endpoint.name, self.process.process)
        await self.registry.set_ready.remote(self.endpoint.name, False)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.registry.deregister.remote(self.endpoint.name)
        await asyncio.to_thread(self.process.stop)


def kv_events_for(name: str, model: str) -> dict:
    """The ``--kv-events-config`` of a pool engine whose model routes on KV events: vLLM's
    ZMQ publisher with a replay socket, on ports the engine's node picks, and llm-d's topic
    convention ``kv@<endpoint>@<model>``."""
    return {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://*:0", "topic": f"kv@{name}@{model}",
    }  # fmt: skip


def engine_name(model: str, index: int) -> str:
    """A readable, DNS-safe endpoint name: ``llama-3-1-8b-instruct-0``."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"{slug}-{index}"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class EngineManager:
    """Keeps every pool at its size and every static endpoint registered."""

    async def __init__(self, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.registry = get_registry()
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.errors: dict[str, str] = {}  # last start failure per engine, so each is logged once
        for model in self.config.models:
            self._create_pool(model)
        self._reconcile = asyncio.get_running_loop().create_task(self._reconcile_loop())

    def _create_pool(self, model: ModelConfig) -> None:
        if model.pool is None:
            return
        for index in range(model.pool.replicas):
            name = engine_name(model.name, index)
            options = {"num_gpus": model.pool.num_gpus_per_engine} if model.pool.num_gpus_per_engine else {}
            engine_config = model.pool.engine_config.model_copy(update={"port": 0})
            if model.prefix_index == "events" and engine_config.kv_events_config is None:
                engine_config.kv_events_config = kv_events_for(name, model.name)
            self.actors[name] = EngineActor.options(**options).remote(
                name, model.name, engine_config, model.pool.engine,
                {"rayfleet.io/model": model.name, "rayfleet.io/engine": model.pool.engine},
            )  # fmt: skip

    async def _register_static(self) -> None:
        for model in self.config.models:
            for index, url in enumerate(model.static_endpoints):
                endpoint = Endpoint(
                    name=f"{engine_name(model.name, index)}-static", url=url.rstrip("/"),
                    model=model.name, models=[model.name], ready=False, source="static",
                )  # fmt: skip
                await self.registry.ensure.remote(endpoint)

    async def _reconcile_loop(self) -> None:
        """Level-triggered: every tick, make reality match the config, whatever happened."""
        while True:
            await self._register_static()
            names = list(self.actors)
            results = await asyncio.gather(
                *(self.actors[n].ensure_running.remote() for n in names), return_exceptions=True
            )
            for name, result in zip(names, results):
                if isinstance(result, BaseException):
                    if self.errors.get(name) != str(result):
                        logger.error("engine %s failed to start: %s", name, result)
                    self.errors[name] = str(result)
                else:
                    self.errors.pop(name, None)
            await asyncio.sleep(RECONCILE_S)

    async def __del__(self) -> None:
        self._reconcile.cancel()
        await asyncio.gather(*(actor.stop.remote() for actor in self.actors.values()), return_exceptions=True)
