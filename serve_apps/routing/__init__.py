"""Routing strategies by the name clients put in the ``routing-strategy`` header."""

from __future__ import annotations

import random

from serve_apps.routing.base import EndpointState, RoutingRequest, RoutingStrategy
from serve_apps.routing.least_request import LeastRequestStrategy
from serve_apps.routing.random_choice import RandomStrategy

STRATEGY_CLASSES: dict[str, type] = {
    cls.name: cls for cls in (RandomStrategy, LeastRequestStrategy)
}


def strategy_names() -> list[str]:
    return sorted(STRATEGY_CLASSES)


def build_strategies(seed: int | None = None) -> dict[str, RoutingStrategy]:
    """One instance of every strategy, sharing one random source (seeded for replays)."""
    rng = random.Random(seed)
    return {name: cls(rng=rng) for name, cls in STRATEGY_CLASSES.items()}


__all__ = [
    "EndpointState",
    "RoutingRequest",
    "RoutingStrategy",
    "build_strategies",
    "strategy_names",
    "STRATEGY_CLASSES",
]
