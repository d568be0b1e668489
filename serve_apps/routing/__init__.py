"""Routing strategies by the name clients put in the ``routing-strategy`` header."""

from __future__ import annotations

import random

from serve_apps.routing.base import EndpointState, RequestHooks, RoutingRequest, RoutingStrategy
from serve_apps.routing.least_busy_time import LeastBusyTimeStrategy
from serve_apps.routing.least_kv_cache import LeastKvCacheStrategy
from serve_apps.routing.least_latency import LeastLatencyStrategy
from serve_apps.routing.least_request import LeastRequestStrategy
from serve_apps.routing.power_of_two import PowerOfTwoStrategy
from serve_apps.routing.prefix_cache import PrefixCacheStrategy
from serve_apps.routing.prefix_cache_and_load import PrefixCacheAndLoadStrategy
from serve_apps.routing.random_choice import RandomStrategy
from serve_apps.routing.session_affinity import SessionAffinityStrategy
from serve_apps.routing.throughput import ThroughputStrategy
from serve_apps.routing.vtc_basic import VtcBasicStrategy

STRATEGY_CLASSES: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomStrategy,
        LeastRequestStrategy,
        PowerOfTwoStrategy,
        ThroughputStrategy,
        LeastBusyTimeStrategy,
        LeastKvCacheStrategy,
        LeastLatencyStrategy,
        PrefixCacheStrategy,
        PrefixCacheAndLoadStrategy,
        VtcBasicStrategy,
        SessionAffinityStrategy,
    )
}


def strategy_names() -> list[str]:
    return sorted(STRATEGY_CLASSES)


def unknown_strategy_message(name: str) -> str:
    """The one wording of this mistake, for config files and request headers alike."""
    return f"unknown routing strategy {name!r}; valid: {', '.join(strategy_names())}"


def known_strategy(name: str) -> str:
    """A pydantic validator: the name of a registered strategy, or a clear ValueError."""
    if name not in STRATEGY_CLASSES:
        raise ValueError(unknown_strategy_message(name))
    return name


def build_strategies(seed: int | None = None) -> dict[str, RoutingStrategy]:
    """One instance of every strategy, sharing one random source (seeded for replays)."""
    rng = random.Random(seed)
    return {name: cls(rng=rng) for name, cls in STRATEGY_CLASSES.items()}


__all__ = [
    "EndpointState",
    "RequestHooks",
    "RoutingRequest",
    "RoutingStrategy",
    "build_strategies",
    "known_strategy",
    "strategy_names",
    "unknown_strategy_message",
    "STRATEGY_CLASSES",
]
