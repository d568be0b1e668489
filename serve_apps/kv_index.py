"""Keeps one KV-event subscriber per engine that publishes events, for models routed on
them (``prefix_index: events``).

A one-replica Serve deployment, so it is deployed and deleted with the application. It
follows the endpoint registry and reconciles level-triggered, once a second: an engine
with the ``rayfleet.io/kv-events`` label gets a ``kvcache.subscriber.KVEventSubscriber``;
an engine that leaves the registry (or comes back on another port) has its subscriber
stopped, which drops its entries from every shard, so the index never sends a prompt to
an endpoint that is gone.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve
from ray.actor import ActorHandle

from kvcache.client import ensure_index
from kvcache.subscriber import KVEventSubscriber
from serve_apps.config import AppConfig
from serve_apps.endpoints import (
    LABEL_KV_EVENTS,
    LABEL_KV_EVENTS_REPLAY,
    LABEL_KV_EVENTS_TOPIC,
)
from serve_apps.registry import get_registry
from serve_apps.view import EndpointView

logger = logging.getLogger(__name__)

RECONCILE_S = 1.0
MODEL_LABEL = "rayfleet.io/model"

# (events endpoint, replay endpoint, topic): a change means a new engine process.
Feed = tuple[str, str | None, str]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10)
class KVIndexManager:
    async def __init__(self, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        settings = self.config.gateway.kv_index
        self.shards = ensure_index(settings.num_shards, settings.max_blocks_per_shard)
        self.models = {model.name for model in self.config.models if model.prefix_index == "events"}
        self.view = EndpointView()
        self.subscribers: dict[str, tuple[Feed, ActorHandle]] = {}
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.view.follow(get_registry)), loop.create_task(self._reconcile_loop())]

    def wanted(self) -> dict[str, Feed]:
        """Endpoint name -> its event feed, for every endpoint of an events-routed model."""
        feeds: dict[str, Feed] = {}
        for endpoint in self.view.endpoints():
            labels = endpoint.labels
            if labels.get(MODEL_LABEL) in self.models and LABEL_KV_EVENTS in labels:
                feeds[endpoint.name] = (
                    labels[LABEL_KV_EVENTS], labels.get(LABEL_KV_EVENTS_REPLAY), labels.get(LABEL_KV_EVENTS_TOPIC, "")
                )
        return feeds

    async def reconcile(self) -> None:
        wanted = self.wanted()
        for name, (feed, actor) in list(self.subscribers.items()):
            if wanted.get(name) != feed:
                await self._stop(name, actor)
        for name, feed in wanted.items():
            if name not in self.subscribers:
                events, replay, topic = feed
                actor = KVEventSubscriber.remote(name, events, replay, self.shards, topic)
                self.subscribers[name] = (feed, actor)
                logger.info("following KV events of %s at %s", name, events)

    async def _stop(self, name: str, actor: ActorHandle) -> None:
        del self.subscribers[name]
        try:
            await actor.stop.remote()
        except ray.exceptions.RayError as exc:
            logger.warning("stopping the KV event subscriber of %s: %r", name, exc)
        ray.kill(actor, no_restart=True)
        logger.info("stopped following KV events of %s", name)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - a bad tick must not end reconciling for good
                logger.exception("KV index reconcile failed; retrying")
            await asyncio.sleep(RECONCILE_S)

    async def status(self) -> dict[str, dict]:
        """Per endpoint, its subscriber's status (batches applied, gaps, replays, resyncs)."""
        names = list(self.subscribers)
        statuses = await asyncio.gather(
            *(self.subscribers[name][1].status.remote() for name in names), return_exceptions=True
        )
        return {
            name: status.model_dump() if not isinstance(status, BaseException) else {"error": repr(status)}
            for name, status in zip(names, statuses)
        }
