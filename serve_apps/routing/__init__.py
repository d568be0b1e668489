"""Routing strategies by the name clients put in the ``routing-strategy`` header."""

from __future__ import annotations

import functools
import inspect
import random
import time
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

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


# Constructor parameters that the gateway wires itself; everything else is a user option.
_WIRED_PARAMETERS = frozenset({"self", "rng", "clock", "fallbacks", "index"})


@functools.cache
def options_model(name: str) -> type[BaseModel]:
    """A pydantic model of the options strategy ``name`` accepts (its constructor's
    keyword parameters, typed and defaulted as there), so a config typo or a wrong type is
    a validation error at deploy time, never a failure on a request."""
    cls = STRATEGY_CLASSES[name]
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {
        parameter.name: (hints[parameter.name], parameter.default)
        for parameter in inspect.signature(cls).parameters.values()
        if parameter.name not in _WIRED_PARAMETERS
    }
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid"), **fields)


def build_strategy(
    name: str,
    rng: random.Random,
    clock: Callable[[], float] = time.monotonic,
    options: Mapping[str, Any] | None = None,
) -> RoutingStrategy:
    """One strategy by name, with its validated ``options``; those that age their signals
    read time from ``clock`` (the discrete-event benchmarks pass their virtual clock)."""
    cls = STRATEGY_CLASSES[name]
    kwargs: dict[str, Any] = options_model(name).model_validate(options or {}).model_dump(exclude_unset=True)
    if "clock" in inspect.signature(cls).parameters:
        kwargs["clock"] = clock
    return cls(rng=rng, **kwargs)


def build_strategies(
    seed: int | None = None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, RoutingStrategy]:
    """One instance of every strategy, sharing one random source (seeded for replays)."""
    rng = random.Random(seed)
    options = options or {}
    return {name: build_strategy(name, rng, options=options.get(name)) for name in STRATEGY_CLASSES}


__all__ = [
    "EndpointState",
    "RequestHooks",
    "RoutingRequest",
    "RoutingStrategy",
    "build_strategies",
    "build_strategy",
    "options_model",
    "known_strategy",
    "strategy_names",
    "unknown_strategy_message",
    "STRATEGY_CLASSES",
]
