"""Reading an autoscaler's metric sources into ``Observation``s.

- ``pod``: every ready endpoint of the model (from the endpoint registry) is scraped at its
  ``/metrics`` and the metric's value for the model summed over the endpoint's lines (vLLM's
  data-parallel ``engine`` label); ``total`` sums over endpoints, ``pods`` counts those that
  answered, as the policies expect (KPA uses the total, HPA and APA the per-pod average).
- ``gateway``: the gateway replicas' own count of the model's requests (in flight, or held
  for a pool scaled to zero), which they report to the registry every second.
- ``external``: one number from an HTTP endpoint (a plain number, or JSON ``{"value": x}``).

A source that cannot be read gives ``pods=0``: the policies then apply HPA's missing-metric
rules instead of scaling on a guess.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from autoscaling.policy import Observation
from autoscaling.spec import GATEWAY_IN_FLIGHT, MetricSource

SCRAPE_TIMEOUT_S = 2.0


def metric_value(text: str, name: str, model: str | None) -> float | None:
    """Sum of ``name``'s samples in Prometheus text, over lines labelled with ``model`` (any
    line when the metric has no ``model_name`` label); None if the metric is absent."""
    total: float | None = None
    label = f'model_name="{model}"'
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name) :]
        if rest[:1] == "{":
            labels, _, rest = rest[1:].partition("}")
            if model is not None and "model_name=" in labels and label not in labels:
                continue
        elif rest[:1] != " ":
            continue  # a longer metric name that starts with this one
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        total = value if total is None else total + value
    return total


async def observe_pods(session: aiohttp.ClientSession, source: MetricSource, urls: list[str], model: str) -> Observation:
    async def scrape(url: str) -> float | None:
        try:
            async with session.get(f"{url}{source.path}") as response:
                return metric_value(await response.text(), source.targetMetric, model) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    values = [v for v in await asyncio.gather(*(scrape(url) for url in urls)) if v is not None]
    return Observation(source.targetMetric, sum(values), len(values))


async def observe_external(session: aiohttp.ClientSession, source: MetricSource) -> Observation:
    try:
        async with session.get(source.endpoint) as response:
            text = await response.text()
        value = float(json.loads(text)["value"]) if text.lstrip().startswith("{") else float(text.strip())
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return Observation(source.targetMetric, 0.0, 0)
    return Observation(source.targetMetric, value, 1)


async def observe_gateway(registry, source: MetricSource, model: str) -> Observation:  # type: ignore[no-untyped-def]
    """The model's requests across the gateway replicas: ``in_flight`` counts every request a
    client waits on (sent to an engine, or held until a pool scaled to zero has one, which
    Knative's activator counts too); ``queued`` only the held ones."""
    load = await registry.model_load.remote(model)
    if load.reporting == 0:
        return Observation(source.targetMetric, 0.0, 0)
    value = load.in_flight + load.queued if source.targetMetric == GATEWAY_IN_FLIGHT else load.queued
    return Observation(source.targetMetric, float(value), 1)
