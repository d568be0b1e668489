"""The autoscaler as a Ray actor: observe on a tick, ask the policy, apply to the target.

One actor per PodAutoscaler. Every second it reads each metric source into the policy
(Knative's one-second buckets); every ``policy.sync_period`` it asks for a replica count and,
when that differs from what the target has, applies it and logs the reason. Its status
(current, desired and ready replicas, the last decision and its numbers, the last scale
time) answers ``rayfleet status`` and is exported as Ray metrics for the dashboard.

The policy is pure and its clock is an argument, so this loop is the only impure part: the
discrete-event benchmark drives the same policy objects on a virtual clock.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import ray
from pydantic import BaseModel
from ray.util.metrics import Counter, Gauge

from autoscaling.observe import SCRAPE_TIMEOUT_S, observe_external, observe_gateway, observe_pods
from autoscaling.policy import Decision, Observation, build_policy
from autoscaling.spec import PodAutoscaler
from autoscaling.targets import ScaleTarget, target_for

logger = logging.getLogger(__name__)

OBSERVE_INTERVAL_S = 1.0


class AutoscalerStatus(BaseModel):
    """What ``rayfleet status`` shows of one autoscaler."""

    name: str
    target: str
    strategy: str
    min: int
    max: int
    current: int
    ready: int
    desired: int | None
    reason: str
    details: dict[str, float]
    last_scale_time: float | None  # unix time of the last applied change
    scale_events: int


@ray.remote(num_cpus=0, max_restarts=-1)
class AutoscalerActor:
    """Runs one PodAutoscaler for ``model`` (whose endpoints feed ``pod`` metrics)."""

    def __init__(self, autoscaler: dict, model: str) -> None:
        self.autoscaler = PodAutoscaler.model_validate(autoscaler)
        self.model = model
        self.spec = self.autoscaler.spec
        self.policy = build_policy(self.spec, self.autoscaler.metadata.annotations)
        self.target: ScaleTarget = target_for(self.spec.scaleTargetRef)
        self.last: Decision | None = None
        self.current = self.ready = 0
        self.last_scale_time: float | None = None
        self.scale_events = 0
        tags = {"autoscaler": self.autoscaler.metadata.name}
        self._gauges = {
            name: Gauge(f"rayfleet_autoscaler_{name}_replicas", f"{name.capitalize()} replicas of the target.",
                        tag_keys=("autoscaler",)).set_default_tags(tags)  # fmt: skip
            for name in ("current", "ready", "desired")
        }
        self._scales = Counter("rayfleet_autoscaler_scale_events_total", "Replica count changes applied.",
                               tag_keys=("autoscaler", "direction")).set_default_tags(tags)  # fmt: skip
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Begin ticking (idempotent; called by whoever created the actor, and again after a
        restart, since Ray re-runs only ``__init__``)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from serve_apps.registry import get_registry

        registry = get_registry()
        next_decision = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as session:
            while True:
                started = time.monotonic()
                try:
                    for observation in await self._observe(session, registry):
                        self.policy.observe(started, observation)
                    if started >= next_decision:
                        next_decision = started + self.policy.sync_period
                        await self._decide(started)
                except Exception:  # a target or registry restarting: keep ticking
                    logger.exception("autoscaler %s: tick failed", self.autoscaler.metadata.name)
                await asyncio.sleep(max(OBSERVE_INTERVAL_S - (time.monotonic() - started), 0.0))

    async def _observe(self, session: aiohttp.ClientSession, registry) -> list[Observation]:  # type: ignore[no-untyped-def]
        observations = []
        urls: list[str] | None = None
        for source in self.spec.metricsSources:
            if source.metricSourceType == "gateway":
                observations.append(await observe_gateway(registry, source, self.model))
            elif source.metricSourceType == "external":
                observations.append(await observe_external(session, source))
            else:
                if urls is None:
                    snapshot = await registry.snapshot.remote()
                    urls = [e.url for e in snapshot.endpoints if e.ready and self.model in e.served_names()]
                observations.append(await observe_pods(session, source, urls, self.model))
        return observations

    async def _decide(self, now: float) -> None:
        scale = await self.target.get_scale()
        self.current, self.ready = scale.replicas, scale.ready
        decision = self.policy.recommend(now, scale.replicas, scale.ready)
        self.last = decision
        if decision.desired != scale.replicas:
            direction = "up" if decision.desired > scale.replicas else "down"
            logger.info("autoscaler %s: scale %s %s %d -> %d: %s", self.autoscaler.metadata.name, self.target.describe(),
                        direction, scale.replicas, decision.desired, decision.reason)  # fmt: skip
            await self.target.set_scale(decision.desired)
            self.current = decision.desired
            self.last_scale_time = time.time()
            self.scale_events += 1
            self._scales.inc(1, {"direction": direction})
        for name, value in (("current", self.current), ("ready", self.ready), ("desired", decision.desired)):
            self._gauges[name].set(value)

    def status(self) -> dict:
        last = self.last
        return AutoscalerStatus(
            name=self.autoscaler.metadata.name, target=self.target.describe(), strategy=self.spec.scalingStrategy,
            min=self.spec.minReplicas, max=self.spec.maxReplicas, current=self.current, ready=self.ready,
            desired=last.desired if last else None, reason=last.reason if last else "no decision yet",
            details=last.details if last else {}, last_scale_time=self.last_scale_time, scale_events=self.scale_events,
        ).model_dump()  # fmt: skip
