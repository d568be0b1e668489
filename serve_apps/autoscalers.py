"""``AutoscalerManager``: the Serve deployment that keeps one autoscaler actor per model
with ``autoscaling`` in the config.

The actors are named (``rayfleet-autoscaler-<model>``) so ``rayfleet status`` can find them,
and owned by this replica, so deleting the application stops them. Level-triggered: every
few seconds each actor is told to run (``start`` is idempotent), which also revives one that
Ray restarted.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve

from autoscaling.runner import AutoscalerActor
from serve_apps.config import AppConfig

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "rayfleet-autoscaler-"
KEEPALIVE_S = 5.0


def autoscaler_actor_name(model: str) -> str:
    return ACTOR_PREFIX + model.replace("/", "--")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AutoscalerManager:
    async def __init__(self, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.actors = {}
        for model in self.config.models:
            if model.autoscaling is None:
                continue
            autoscaler = model.autoscaling.pod_autoscaler(model.name)
            name = autoscaler_actor_name(model.name)
            try:  # a previous replica's actor outlives it only until its owner's death is noticed
                ray.kill(ray.get_actor(name))
            except ValueError:
                pass
            self.actors[model.name] = AutoscalerActor.options(name=name).remote(autoscaler.model_dump(mode="json"), model.name)
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_running())

    async def _keep_running(self) -> None:
        while True:
            results = await asyncio.gather(*(a.start.remote() for a in self.actors.values()), return_exceptions=True)
            for model, result in zip(self.actors, results):
                if isinstance(result, BaseException):
                    logger.warning("autoscaler for %s unavailable: %s", model, result)
            await asyncio.sleep(KEEPALIVE_S)

    async def status(self) -> list[dict]:
        return list(await asyncio.gather(*(a.status.remote() for a in self.actors.values())))

    async def __del__(self) -> None:
        self._keepalive.cancel()
        for actor in self.actors.values():
            ray.kill(actor)
