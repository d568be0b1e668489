"""Which endpoints hold which prompt blocks: the seam between prefix-aware routing and its evidence.

``PrefixIndex`` is what the prefix strategies consult. ``ApproximatePrefixIndex`` learns
only from the gateway's own routing decisions (an endpoint that was sent a prompt is
assumed to cache it). The engines' own KV events live in the shared ``kvcache`` index on
Ray actors, which a strategy cannot await: the gateway looks a prompt up there before
routing and hands the answer over in ``RoutingRequest.derived``
(``_prefix_common.match_prompt`` prefers it), so this local index is the fallback.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from kvcache.index import longest_prefix


class PrefixIndex(Protocol):
    def match(self, block_hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        matched = longest_prefix(block_hashes, self._holders, candidates)
        # The matched chain was just used: touch it tail first, so its head stays newest.
        move_to_end = self._holders.move_to_end
        for index in range(max(matched.values(), default=0) - 1, -1, -1):
            move_to_end(block_hashes[index])
        return matched

    def record(self, block_hashes: Sequence[int], endpoint: str) -> None:
        """``endpoint`` now holds these blocks."""
        ...

    def remove_endpoint(self, endpoint: str) -> None:
        """Forget everything about ``endpoint`` (it left the fleet or lost its cache)."""
        ...

    def __len__(self) -> int:
        """Number of distinct blocks indexed."""
        ...


class ApproximatePrefixIndex:
    """A bounded LRU map from block hash to the endpoints believed to hold that block.

    Blocks are touched tail first, so within one prompt the first block is the most
    recently used and eviction removes a prefix's end before its start; evicting the head
    would orphan every later block, since a match has to start at block 0. That mirrors the
    engine, which frees a finished request's blocks tail first for the same reason.
    """

    def __init__(self, max_blocks: int = 200_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, block_hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        matched = dict.fromkeys(candidates, 0)
        holders_of = self._holders
        remaining = set(matched)
        depth = 0
        for block_hash in block_hashes:
            holders = holders_of.get(block_hash)
            if holders is None:
                break
            holding = remaining & holders
            if not holding:
                break
            if len(holding) != len(remaining):
                for name in remaining - holding:
                    matched[name] = depth
                remaining = holding
            depth += 1
        for name in remaining:
            matched[name] = depth
        move_to_end = holders_of.move_to_end
        for index in range(depth - 1, -1, -1):
            move_to_end(block_hashes[index])
        return matched

    def record(self, block_hashes: Sequence[int], endpoint: str) -> None:
        holders_of = self._holders
        for block_hash in reversed(block_hashes):
            holders = holders_of.get(block_hash)
            if holders is None:
                holders_of[block_hash] = {endpoint}
            else:
                holders.add(endpoint)
                holders_of.move_to_end(block_hash)
        excess = len(holders_of) - self.max_blocks
        for _ in range(excess):
            holders_of.popitem(last=False)

    def remove_endpoint(self, endpoint: str) -> None:
        holders_of = self._holders
        emptied: list[int] = []
        for block_hash, holders in holders_of.items():
            holders.discard(endpoint)
            if not holders:
                emptied.append(block_hash)
        for block_hash in emptied:
            del holders_of[block_hash]
