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


# ``RoutingRequest.derived`` key of matches looked up before routing in the engines' own
# KV events (the shared ``kvcache`` index): ``(hasher.memo_key, {endpoint: leading blocks})``.
INDEXED_MATCHES_KEY = "kv_index_matches"


def match_prompt(
    index: PrefixIndex, request: RoutingRequest, candidates: Sequence[EndpointState], hasher: BlockHasher
) -> tuple[list[int], dict[str, int]]:
    """The request's block hashes and, per candidate name, its matched leading blocks.

    Matches the gateway fetched from the KV-event index for this request (same hashing)
    take precedence: they are what the engines report holding. Without them (approximate
    mode, or the index missed its time budget) the strategy's local index answers.
    """
    hashes = block_hashes(request, hasher)
    names = [candidate.name for candidate in candidates]
    if not hashes:
        return hashes, dict.fromkeys(names, 0)
    indexed = request.derived.get(INDEXED_MATCHES_KEY)
    if indexed is not None and indexed[0] == hasher.memo_key:
        matches = indexed[1]
        return hashes, {name: matches.get(name, 0) for name in names}
    return hashes, index.match(hashes, names)
