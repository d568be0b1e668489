"""``prefix-cache``: send a prompt where its longest prefix is already cached, within a load bound.

Signal: per candidate, the number of leading prompt blocks the ``PrefixIndex`` says it
holds (block hashes as the engine computes them), and ``in_flight`` as the load.

Rule: if the best match is at least ``min_match_blocks`` blocks, take the candidate with the
longest match (ties: fewer in flight, then uniform random) unless it is overloaded, i.e.
``in_flight > min_in_flight + imbalance_abs`` and ``in_flight > imbalance_ratio ×
mean_in_flight`` over the candidates; when it is overloaded, or nothing matches well
enough, take the least loaded candidate (uniform ties). The chosen endpoint is then recorded
in the index as holding the prompt's blocks, which is how the default index learns.

Blocks are hashed as the engines hash them (``block_size``, ``hash_algo`` =
``--prefix-caching-hash-algo``, ``hash_seed`` = their ``PYTHONHASHSEED``); the defaults are
the engines' defaults.
"""

from __future__ import annotations

import random
from typing import ClassVar, Sequence

from kvcache.hashing import DEFAULT_BLOCK_SIZE, DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED, BlockHasher, HashAlgo
from serve_apps.routing._prefix_common import ImbalanceBound, in_flight, least_loaded, match_prompt
from serve_apps.routing.base import EndpointState, RoutingRequest, pick_uniform_minimum
from serve_apps.routing.prefix_index import ApproximatePrefixIndex, PrefixIndex


class PrefixCacheStrategy:
    name: ClassVar[str] = "prefix-cache"

    def __init__(
        self,
        rng: random.Random | None = None,
        index: PrefixIndex | None = None,
        imbalance_abs: int = 8,
        imbalance_ratio: float = 1.5,
        min_match_blocks: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        hash_algo: HashAlgo = DEFAULT_HASH_ALGO,
        hash_seed: str = DEFAULT_HASH_SEED,
    ) -> None:
        self._rng = rng or random.Random()
        self.index: PrefixIndex = index if index is not None else ApproximatePrefixIndex()
        self.hasher = BlockHasher(hash_algo, hash_seed, block_size)
        self._bound = ImbalanceBound(imbalance_abs, imbalance_ratio)
        self._min_match_blocks = min_match_blocks

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState:
        hashes, matched = match_prompt(self.index, request, candidates, self.hasher)
        best_match = max(matched.values())
        chosen: EndpointState | None = None
        if best_match >= self._min_match_blocks:
            holders = [candidate for candidate in candidates if matched[candidate.name] == best_match]
            chosen = pick_uniform_minimum(holders, in_flight, self._rng)
            if chosen.in_flight > self._bound.threshold(candidates):
                chosen = None
        if chosen is None:
            chosen = least_loaded(candidates, self._rng)
        if hashes:
            self.index.record(hashes, chosen.name)
        return chosen
