"""The rayfleet Serve application: a gateway ingress, the engine manager, the user service
when limits are on, when a model routes on KV events the manager of their subscribers and,
with ``kubernetes_discovery``, the follower of serving pods.

``build_app`` is the import path for ``serve run`` / ``serve deploy`` (see
``serve_apps/serve_config.yaml``); ``rayfleet up`` calls it with embedded defaults.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from engines.core.tokenizer import get_tokenizer
from kvcache.client import KVIndexClient, ensure_index
from serve_apps.autoscalers import AutoscalerManager
from serve_apps.config import AppConfig
from serve_apps.engine_pool import EngineManager
from serve_apps.gateway import GatewayApp
from serve_apps.kube_discovery import KubeDiscovery
from serve_apps.kv_index import KVIndexManager
from serve_apps.metrics import GatewayMetrics
from serve_apps.registry import get_registry
from serve_apps.routing.fallback import FALLBACKS
from serve_apps.scraper import MetricsScraper
from serve_apps.users import open_store
from serve_apps.users.limiter import Limiter
from serve_apps.users.service import UserService
from serve_apps.view import EndpointView

GAUGE_PUBLISH_S = 1.0
VIEW_LOAD_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},
)
@serve.ingress()
class Gateway:
    """One gateway replica: the ASGI app plus its background registry follower."""

    async def __init__(
        self,
        config: dict,
        engine_manager: DeploymentHandle | None = None,
        kv_index_manager: DeploymentHandle | None = None,
        user_service: DeploymentHandle | None = None,
        autoscaler_manager: DeploymentHandle | None = None,
        kube_discovery: DeploymentHandle | None = None,
    ) -> None:
        self._tasks: list[asyncio.Task] = []
        self.scraper: MetricsScraper | None = None
        self.config = AppConfig.model_validate(config)
        # Bound into the ingress so Serve deploys the manager with the application; it is
        # never called on a request's path.
        self.engine_manager = engine_manager
        self.kv_index_manager = kv_index_manager
        self.autoscaler_manager = autoscaler_manager
        self.kube_discovery = kube_discovery
        self.view = EndpointView()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        await self._load_view()
        self.metrics = GatewayMetrics()
        kv_index = None
        if self.config.uses_kv_events:
            settings = self.config.gateway.kv_index
            kv_index = KVIndexClient(ensure_index(settings.num_shards, settings.max_blocks_per_shard))
        limiter = user_api = None
        if self.config.users.enabled and user_service is not None:
            # Admission goes to the store directly; only user-API calls take the handle hop.
            limiter = Limiter(self.config.users, open_store(self.config.users))
            user_api = user_service.handle.remote
        self.gateway_app = GatewayApp(self.config, self.view, self.metrics, kv_index, limiter, user_api)
        # The prefix strategies tokenise prompts; building the vocabulary takes ~0.3 s,
        # which belongs to start-up, not to the first request that asks for them.
        get_tokenizer()
        # Engines' own load signals (KV usage, queue) for the strategies that use them.
        self.scraper = MetricsScraper(self.view.endpoints, interval_s=self.config.gateway.scrape_interval_s)
        self.scraper.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.view.follow(get_registry)), loop.create_task(self._publish_gauges())]

    async def _load_view(self) -> None:
        """Start from the registry's current table: a replica that replaces a dead one must
        know the engines before Serve sends it requests, or it would answer 400 (unknown
        model) for models that are being served."""
        try:
            self.view.apply(await asyncio.wait_for(get_registry().snapshot.remote(), VIEW_LOAD_TIMEOUT_S))
        except Exception as exc:  # no registry yet (first start) or a slow one: follow() catches up
            logger.warning("starting without the endpoint table: %r", exc)

    def __serve_build_asgi_app__(self) -> GatewayApp:
        return self.gateway_app

    async def _publish_gauges(self) -> None:
        """In-flight counts, routing fallbacks and rate-limit decisions, on a timer rather than per request."""
        while True:
            await asyncio.sleep(GAUGE_PUBLISH_S)
            self.metrics.publish_in_flight({e.name: e.in_flight for e in self.view.endpoints()})
            waiting = self.view.waiting_by_model()
            self.metrics.publish_queued({m.name: waiting.get(m.name, 0) for m in self.config.models})
            await self._report_load()
            self.metrics.publish_fallbacks(FALLBACKS.snapshot())
            if self.gateway_app.limiter is not None:
                self.metrics.publish_admissions(self.gateway_app.limiter.outcomes)

    async def _report_load(self) -> None:
        """Requests in flight and held per model, for autoscalers that scale on the gateway's signal."""
        try:
            await get_registry().report_load.remote(
                self._replica_id, self.view.in_flight_by_model(), self.view.waiting_by_model()
            )
        except ray.exceptions.RayError as exc:  # a restarting registry: the next tick reports again
            logger.debug("load report failed: %s", exc)

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.scraper is not None:
            await self.scraper.stop()
        await self.gateway_app.close()


def build_app(args: dict | None = None) -> serve.Application:
    """Build the application from a config dict (the ``args`` of a Serve config file)."""
    try:
        config = AppConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ValueError(f"invalid rayfleet application config: {exc}") from None
    gateway = Gateway.options(
        num_replicas=config.gateway.num_replicas, max_ongoing_requests=config.gateway.max_ongoing_requests
    )
    payload = config.model_dump(mode="json")
    kv_index_manager = KVIndexManager.bind(payload) if config.uses_kv_events else None
    user_service = UserService.bind(payload["users"]) if config.users.enabled else None
    # The engine manager gets only the models: a change to the gateway's or the users'
    # settings then redeploys the gateway alone, and the engines keep running.
    engine_manager = EngineManager.bind({"models": payload["models"]})
    autoscalers = any(model.autoscaling is not None for model in config.models)
    autoscaler_manager = AutoscalerManager.bind({"models": payload["models"]}) if autoscalers else None
    kube_discovery = KubeDiscovery.bind(payload["kubernetes_discovery"]) if config.kubernetes_discovery else None
    return gateway.bind(payload, engine_manager, kv_index_manager, user_service, autoscaler_manager, kube_discovery)
