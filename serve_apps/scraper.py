"""Scrape every engine's ``/metrics`` in the background and keep the gauges routing reads.

Routing never waits for a scrape: strategies read whatever ``EndpointState.engine_metrics``
holds and ``signals.fresh`` rejects it once it is too old. A failed scrape therefore leaves
the previous value in place, and a strategy falls back (counted) when it ages out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

import aiohttp

from rayfleet.protocol.vllm_metrics import (
    GPU_CACHE_USAGE_PERC,
    KV_CACHE_USAGE_PERC,
    LABEL_MODEL_NAME,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
)
from serve_apps.routing.base import EndpointState
from serve_apps.routing.signals import EngineMetrics

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 1.0
_WANTED = (NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, KV_CACHE_USAGE_PERC, GPU_CACHE_USAGE_PERC)
_MODEL_LABEL_PREFIX = f'{LABEL_MODEL_NAME}="'


def _model_label(labels: str) -> str | None:
    start = labels.find(_MODEL_LABEL_PREFIX)
    if start < 0:
        return None
    start += len(_MODEL_LABEL_PREFIX)
    end = labels.find('"', start)
    return labels[start:end] if end >= 0 else None


def parse_vllm_metrics(text: str, model: str | None, scraped_at: float) -> EngineMetrics | None:
    """The routing gauges of ``model`` (every model if None) in Prometheus text, or None.

    Only the few wanted lines are split; the rest is skipped on a prefix test, because an
    engine's page is mostly histogram buckets. Request counts are summed over the ``engine``
    label (data-parallel engines behind one server); KV usage, a fraction, is averaged, since
    two engines at 60 % are 60 % full, not 120 %. The pre-0.10 ``gpu_cache_usage_perc`` is
    read when ``kv_cache_usage_perc`` is absent. None if a gauge is missing for the model,
    which the caller treats like a failed scrape.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        name = line[:brace] if brace >= 0 else line.split(" ", 1)[0]
        if name not in _WANTED:
            continue
        if brace >= 0:
            labels, _, rest = line[brace + 1 :].rpartition("}")
            if model is not None and _model_label(labels) != model:
                continue
        else:
            if model is not None:
                continue
            rest = line[len(name) :]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    kv_name = KV_CACHE_USAGE_PERC if KV_CACHE_USAGE_PERC in sums else GPU_CACHE_USAGE_PERC
    if NUM_REQUESTS_RUNNING not in sums or NUM_REQUESTS_WAITING not in sums or kv_name not in sums:
        return None
    return EngineMetrics(
        scraped_at=scraped_at,
        num_requests_running=sums[NUM_REQUESTS_RUNNING],
        num_requests_waiting=sums[NUM_REQUESTS_WAITING],
        kv_cache_usage=sums[kv_name] / counts[kv_name],
    )


class MetricsScraper:
    """Every ``interval_s``, scrape all endpoints concurrently and store their gauges.

    ``endpoints`` is called each round, so endpoints that join or leave are picked up
    without telling the scraper. One ``aiohttp`` session is reused for every scrape so
    connections stay open between rounds.
    """

    def __init__(
        self,
        endpoints: Callable[[], Iterable[EndpointState]],
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        model: str | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._model = model
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run in the background on the current event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="metrics-scraper")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def run(self) -> None:
        """Scrape forever, one round per interval (a slow round delays the next, never overlaps)."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                started = time.monotonic()
                await self.scrape_once(session)
                await asyncio.sleep(max(self._interval_s - (time.monotonic() - started), 0.0))

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._scrape(session, endpoint) for endpoint in list(self._endpoints())))

    async def _scrape(self, session: aiohttp.ClientSession, endpoint: EndpointState) -> None:
        try:
            async with session.get(f"{endpoint.url}/metrics") as response:
                if response.status != 200:
                    logger.debug("scraping %s: HTTP %d", endpoint.name, response.status)
                    return
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.debug("scraping %s failed: %r", endpoint.name, exc)
            return
        metrics = parse_vllm_metrics(text, self._model, time.monotonic())
        if metrics is not None:
            endpoint.on_scrape(metrics)
