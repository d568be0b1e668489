"""``vtc-basic``: Virtual Token Counter fairness (Sheng et al., OSDI'24, "Fairness in
Serving LLMs") combined with endpoint load, after AIBrix's ``vtc-basic``.

User: the ``user`` header, else the body's ``user`` field; none → least-request, counted
as a fallback (reason ``no-user``).

Counters (VTC): each user has a counter of served tokens, ``prompt + 2 x output``, added
with the actual tokens when a request finishes (``record_served``). A user with no request
in flight is idle; when it becomes active (``record_start``) its counter is lifted to the
minimum counter of the active users, or, if none is active, to the counter of the user who
went idle last. So an idle spell earns no credit to burst later, as VTC prescribes.

Routing: candidates are ranked by load (``in_flight`` ascending, ties shuffled), rank ``i``
in 0..n-1. The user's position ``p`` = (c_user − c_min) / (c_max − c_min) over the active
users' counters and the user's own (0 if they are all equal), and its target rank is
``t = p x (n − 1)``. Score of rank ``i`` = ``fairness_weight x |i − t| / (n − 1)``
+ ``utilisation_weight x in_flight_i / max_in_flight``; lowest wins, ties uniform. The
lightest user thus gets the least-loaded endpoint, the heaviest the busiest, and the
utilisation term (weighted below fairness so it cannot cancel it at the extremes) prefers
the idler of two endpoints close to the target. AIBrix's code uses pod order from a random
shuffle as the rank and ``num_requests_running / 100`` as utilisation; ranking by load is
what makes "steer the heavy user to busy endpoints" actually mean busy.
"""

from __future__ import annotations

import random
from typing import ClassVar, Sequence

from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum
from serve_apps.routing.fallback import FallbackCounter, LeastRequestFallback
from serve_apps.routing.signals import OUTPUT_TOKEN_WEIGHT

USER_HEADER = "user"
DEFAULT_FAIRNESS_WEIGHT = 1.0
DEFAULT_UTILISATION_WEIGHT = 0.5


def user_of(request: RoutingRequest) -> str | None:
    """The ``user`` header, else the OpenAI body field ``user``."""
    user = request.headers.get(USER_HEADER) or request.body.get("user")
    return user if isinstance(user, str) and user else None


class VtcBasicStrategy:
    name: ClassVar[str] = "vtc-basic"

    def __init__(
        self,
        rng: random.Random | None = None,
        fairness_weight: float = DEFAULT_FAIRNESS_WEIGHT,
        utilisation_weight: float = DEFAULT_UTILISATION_WEIGHT,
        fallbacks: FallbackCounter | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._fairness_weight = fairness_weight
        self._utilisation_weight = utilisation_weight
        self._fallback = LeastRequestFallback(self.name, self._rng, fallbacks)
        self._counters: dict[str, float] = {}
        self._active: dict[str, int] = {}  # user -> requests in flight
        self._last_idle_counter = 0.0

    def counter(self, user: str) -> float:
        return self._counters.get(user, 0.0)

    def record_start(self, user: str) -> None:
        """A request of ``user`` was admitted; lifts the counter if the user was idle."""
        if self._active.get(user, 0) == 0:
            self._counters[user] = max(self.counter(user), self._lift_floor())
        self._active[user] = self._active.get(user, 0) + 1

    def record_served(self, user: str, prompt_tokens: int, output_tokens: int) -> None:
        """A request of ``user`` finished (errors too, with the tokens actually served)."""
        self._counters[user] = self.counter(user) + prompt_tokens + OUTPUT_TOKEN_WEIGHT * output_tokens
        remaining = self._active.get(user, 0) - 1
        if remaining > 0:
            self._active[user] = remaining
            return
        self._active.pop(user, None)
        self._last_idle_counter = self._counters[user]

    def on_request_start(self, request: RoutingRequest) -> None:
        """The gateway's hook (``RequestHooks``): once per request routed by this strategy."""
        user = user_of(request)
        if user is not None:
            self.record_start(user)

    def on_request_finish(self, request: RoutingRequest, prompt_tokens: int, output_tokens: int) -> None:
        user = user_of(request)
        if user is not None:
            self.record_served(user, prompt_tokens, output_tokens)

    def _lift_floor(self) -> float:
        if self._active:
            return min(self._counters[user] for user in self._active)
        return self._last_idle_counter

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        user = user_of(request)
        if user is None:
            return self._fallback.choose("no-user", request, candidates)
        if len(candidates) == 1:
            return candidates[0]
        own = self.counter(user) if user in self._active else max(self.counter(user), self._lift_floor())
        counters = [own, *(self._counters[other] for other in self._active if other != user)]
        low, high = min(counters), max(counters)
        position = (own - low) / (high - low) if high > low else 0.0
        ranked = sorted(self._rng.sample(candidates, len(candidates)), key=lambda endpoint: endpoint.in_flight)
        last_rank = len(ranked) - 1
        target = position * last_rank
        busiest = max(ranked[-1].in_flight, 1)
        scores = {
            endpoint.name: self._fairness_weight * abs(rank - target) / last_rank
            + self._utilisation_weight * endpoint.in_flight / busiest
            for rank, endpoint in enumerate(ranked)
        }
        return pick_uniform_minimum(ranked, lambda endpoint: scores[endpoint.name], self._rng)
