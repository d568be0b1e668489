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
import time

import aiohttp
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
from serve_apps.scraper import parse_vllm_metrics

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
RECONCILE_S = 5.0
DRAIN_POLL_S = 1.0
DRAIN_IDLE_POLLS = 2  # idle twice in a row: no request was on its way when it was deregistered
DRAIN_TIMEOUT_S = 600.0


@ray.remote(num_cpus=0, max_restarts=-1)
class EngineActor:
    """One engine endpoint: the process, its registration and a registry heartbeat."""

    def __init__(self, name: str, model: str, config: EngineConfig, kind: EngineKind, labels: dict[str, str]) -> None:
        self.process = EngineProcess(name, config, kind)
        self.model = model
        self.labels = labels
        self.endpoint: Endpoint | None = None  # described at each start, when its ports are known
        self.registry = get_registry()
        self._heartbeat: asyncio.Task | None = None
        self._start_lock = asyncio.Lock()
        self._retired = False  # draining or stopped: never started or registered again

    def _describe(self) -> Endpoint:
        """The registry entry for the process's current start: its ports may differ from
        the last start's (``EngineProcess`` resolves port 0 afresh each time)."""
        labels = dict(self.labels)
        events = self.process.kv_event_endpoints()
        if events is not None:  # where the KV index's subscriber finds this engine's events
            publish, replay = events
            topic = (self.process.config.kv_events_config or {}).get("topic", "")
            labels |= {LABEL_KV_EVENTS: publish, LABEL_KV_EVENTS_TOPIC: topic}
            if replay is not None:
                labels[LABEL_KV_EVENTS_REPLAY] = replay
        return Endpoint(
            name=self.process.name, url=self.process.url, model=self.model, models=[self.model], ready=True,
            labels=labels, source="pool",
        )  # fmt: skip

    async def ensure_running(self) -> Endpoint:
        """Start the engine if it is not running, then (re-)register it. Idempotent.

        A retired engine refuses: a reconcile tick that raced a scale-down must not revive
        its heartbeat, which would register the draining engine again under its name."""
        async with self._start_lock:
            if self._retired:
                raise RuntimeError(f"engine {self.process.name} is retired (drained or stopped)")
            if not self.process.alive():
                await self.process.start()
                self.endpoint = self._describe()
                await self.registry.register.remote(self.endpoint)
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop(self.endpoint))
        return self.endpoint

    async def _heartbeat_loop(self, endpoint: Endpoint) -> None:
        while self.process.alive():
            try:
                await self.registry.ensure.remote(endpoint)
            except ray.exceptions.RayActorError:
                self.registry = get_registry()
            await asyncio.sleep(HEARTBEAT_S)
        logger.warning("engine %s exited (%s); marking it not ready", endpoint.name, self.process.process)
        await self.registry.set_ready.remote(endpoint.name, False)

    async def _retire(self) -> None:
        """Leave the registry for good: no heartbeat, no restart, no registration again."""
        self._retired = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.registry.deregister.remote(self.process.name)

    async def stop(self) -> None:
        await self._retire()
        await asyncio.to_thread(self.process.stop)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Leave the registry (gateways stop sending here), wait until the engine has no
        request running or waiting, then stop. Returns the seconds it took.

        Idle must be seen twice, ``DRAIN_POLL_S`` apart: a gateway that chose this engine
        just before its view dropped it may still be sending. After ``timeout_s`` the engine
        stops anyway, so a stuck request cannot hold a GPU forever.
        """
        started = time.monotonic()
        await self._retire()
        idle_polls = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while idle_polls < DRAIN_IDLE_POLLS and time.monotonic() - started < timeout_s and self.process.alive():
                await asyncio.sleep(DRAIN_POLL_S)
                idle_polls = idle_polls + 1 if await self._idle(session) else 0
        await asyncio.to_thread(self.process.stop)
        return time.monotonic() - started

    async def _idle(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.process.url}/metrics") as response:
                metrics = parse_vllm_metrics(await response.text(), None, time.monotonic())
        except (aiohttp.ClientError, TimeoutError):
            return False
        return metrics is not None and metrics.num_requests_running + metrics.num_requests_waiting == 0


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
    """Keeps every pool at its size and every static endpoint registered.

    A pool's size starts at its configured ``replicas``; ``scale_pool`` (the autoscaler)
    changes it. New engines join the registry when their ``/health`` answers; removed ones
    drain first (``EngineActor.drain``), so a scale-down cuts off no request.
    """

    async def __init__(self, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.registry = get_registry()
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.pools: dict[str, list[str]] = {}  # model -> its engines' names, oldest first
        self.draining: dict[str, dict[str, asyncio.Task]] = {}  # model -> engines on their way out
        self.errors: dict[str, str] = {}  # last start failure per engine, so each is logged once
        self._next_index: dict[str, int] = {}
        for model in self.config.models:
            if model.pool is not None:
                self.pools[model.name], self.draining[model.name] = [], {}
                for _ in range(model.pool.replicas):
                    self._add_engine(model)
        self._reconcile = asyncio.get_running_loop().create_task(self._reconcile_loop())

    def _add_engine(self, model: ModelConfig) -> None:
        assert model.pool is not None
        index = self._next_index.get(model.name, 0)
        self._next_index[model.name] = index + 1
        name = engine_name(model.name, index)
        options = {"num_gpus": model.pool.num_gpus_per_engine} if model.pool.num_gpus_per_engine else {}
        engine_config = model.pool.engine_config.model_copy(update={"port": 0})
        if model.prefix_index == "events" and engine_config.kv_events_config is None:
            engine_config.kv_events_config = kv_events_for(name, model.name)
        self.actors[name] = EngineActor.options(**options).remote(
            name, model.name, engine_config, model.pool.engine,
            {"rayfleet.io/model": model.name, "rayfleet.io/engine": model.pool.engine},
        )  # fmt: skip
        self.pools[model.name].append(name)

    def _model(self, name: str) -> ModelConfig:
        for model in self.config.models:
            if model.name == name and model.pool is not None:
                return model
        raise ValueError(f"model {name!r} has no engine pool to scale; pools: {', '.join(self.pools) or 'none'}")

    async def scale_pool(self, model: str, replicas: int) -> dict[str, int]:
        """Grow the pool with new engines, or drain its newest ones; returns ``pool_scale``.

        Only within the bounds of the model's ``autoscaling`` as deployed now: while an
        application is redeployed, the previous config's autoscaler lives a little longer
        than its config and must not resize a pool that is no longer its to scale."""
        config = self._model(model)
        if config.autoscaling is None:
            raise ValueError(f"model {model!r} has no autoscaling in the deployed config; its pool stays at its replicas")
        replicas = min(max(replicas, config.autoscaling.min_replicas), config.autoscaling.max_replicas)
        names = self.pools[model]
        loop = asyncio.get_running_loop()
        while len(names) < replicas:
            self._add_engine(config)
            # Start it now rather than at the next reconcile tick: a burst is waiting.
            loop.create_task(self._start(names[-1]))
        while len(names) > max(replicas, 0):
            name = names.pop()
            actor = self.actors.pop(name)
            self.errors.pop(name, None)
            self.draining[model][name] = loop.create_task(self._drain(model, name, actor))
        return await self.pool_scale(model)

    async def _start(self, name: str) -> None:
        actor = self.actors.get(name)
        if actor is not None:
            try:
                await actor.ensure_running.remote()
            except ray.exceptions.RayError as exc:  # the reconcile loop retries and logs it
                self.errors[name] = str(exc)

    async def _drain(self, model: str, name: str, actor: ray.actor.ActorHandle) -> None:
        try:
            seconds = await actor.drain.remote()
            logger.info("engine %s drained in %.1fs and stopped", name, seconds)
        except ray.exceptions.RayError as exc:
            logger.warning("engine %s died while draining: %s", name, exc)
        finally:
            self.draining[model].pop(name, None)
            ray.kill(actor)

    async def pool_scale(self, model: str) -> dict[str, int]:
        """``replicas``: engines the pool has (starting ones included, draining ones not);
        ``ready``: those the registry has seen healthy; ``draining``: on their way out."""
        self._model(model)
        names = set(self.pools[model])
        snapshot = await self.registry.snapshot.remote()
        ready = sum(1 for e in snapshot.endpoints if e.name in names and e.ready)
        return {"replicas": len(names), "ready": ready, "draining": len(self.draining[model])}

    async def _register_static(self) -> None:
        for model in self.config.models:
            for index, url in enumerate(model.static_endpoints):
                endpoint = Endpoint(
                    name=f"{engine_name(model.name, index)}-static", url=url.rstrip("/"),
                    model=model.name, models=[model.name], ready=False, source="static",
                )  # fmt: skip
                await self.registry.ensure.remote(endpoint)

    async def _reconcile_loop(self) -> None:
        """Level-triggered: every tick, make reality match the desired pools, whatever happened."""
        while True:
            await self._register_static()
            names = list(self.actors)
            results = await asyncio.gather(
                *(self.actors[n].ensure_running.remote() for n in names), return_exceptions=True
            )
            for name, result in zip(names, results):
                if name not in self.actors:  # scaled away while the tick ran
                    continue
                if isinstance(result, BaseException):
                    if self.errors.get(name) != str(result):
                        logger.error("engine %s failed to start: %s", name, result)
                    self.errors[name] = str(result)
                else:
                    self.errors.pop(name, None)
            await asyncio.sleep(RECONCILE_S)

    async def __del__(self) -> None:
        self._reconcile.cancel()
        for tasks in self.draining.values():
            for task in tasks.values():
                task.cancel()
        await asyncio.gather(*(actor.stop.remote() for actor in self.actors.values()), return_exceptions=True)
