"""What the prefix-aware strategies share: the prompt-to-match lookup and the load guard.

Cache affinity concentrates traffic (one popular system prompt would otherwise send every
request to one endpoint), so both strategies bound how far it may unbalance the fleet
with the same rule.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.hashing import BlockHasher
from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum
from serve_apps.routing.prefix_index import PrefixIndex
from serve_apps.routing.prompt_blocks import block_hashes


@dataclass(frozen=True, slots=True)
class ImbalanceBound:
    """An endpoint is overloaded when its in-flight count exceeds BOTH
    ``min_in_flight + absolute`` and ``ratio × mean_in_flight`` over the candidates.

    The absolute slack keeps a quiet fleet (where one extra request is a large ratio) on
    its cache; the ratio keeps a busy fleet (where 8 extra requests are noise) on its cache.
    """

    absolute: int = 8
    ratio: float = 1.5

    def threshold(self, candidates: Sequence[EndpointState]) -> float:
        """In-flight count above which an endpoint counts as overloaded among ``candidates``."""
        total = 0
        minimum = candidates[0].in_flight
        for candidate in candidates:
            total += candidate.in_flight
            if candidate.in_flight < minimum:
                minimum = candidate.in_flight
        return max(minimum + self.absolute, self.ratio * total / len(candidates))


def in_flight(endpoint: EndpointState) -> int:
    return endpoint.in_flight


def least_loaded(candidates: Sequence[EndpointState], rng: random.Random) -> EndpointState:
    return pick_uniform_minimum(candidates, in_flight, rng)


def match_prompt(
    index: PrefixIndex, request: RoutingRequest, candidates: Sequence[EndpointState], hasher: BlockHasher
) -> tuple[list[int], dict[str, int]]:
    """The request's block hashes and, per candidate name, its matched leading blocks."""
    hashes = block_hashes(request, hasher)
    if not hashes:
        return hashes, dict.fromkeys((candidate.name for candidate in candidates), 0)
    return hashes, index.match(hashes, [candidate.name for candidate in candidates])
