"""One shard of the cluster-wide prefix index, as a plain data structure (no Ray, no I/O).

It maps a KV block hash to the engines that hold that block, as the engines' own KV
events describe their caches, and answers "who holds these blocks" for a prompt.

Memory is what limits the index (10M blocks over 4 shards is the design point), so a
block costs one ``dict[int, int]`` entry and nothing else:

- the value packs the holders as a bitmask over small *holder ids* (one id per
  ``(endpoint, medium)`` pair, so a CPU-offloaded copy is a different bit from the GPU
  one) above the block's last-stored time in whole seconds (low 32 bits). Equal values
  are interned, so the blocks stored in one second for one set of holders share one int
  object: the value costs the dict slot only;
- the dict's own insertion order is the LRU order: using a block pops and re-inserts it,
  and eviction takes the oldest keys from the front. No second structure per block.

Measured at 1M blocks (64-bit hashes, 8 endpoints): ~78 bytes per block by tracemalloc
(dict slot and index ~42, key int 36), ~90 bytes of RSS; an ``OrderedDict`` of sets per
block (``ApproximatePrefixIndex``'s layout) takes ~450 bytes of RSS. Under steady re-stores
(``rayfleet bench kvindex`` replays its events) it reads ~103 bytes: every re-insert leaves
a dead slot in the dict's entry table until the table fills and the resize compacts it, so
memory swings between those two figures; the bound on blocks holds throughout.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import IntEnum
from itertools import islice
from typing import NamedTuple

from rayfleet.protocol.kv_events import BlockRemoved, BlockStored, KVEvent

DEFAULT_MEDIUM = "GPU"
_TIME_BITS = 32
_TIME_MASK = (1 << _TIME_BITS) - 1
# Bound on the interning table; it only has to cover the values written recently.
_MAX_INTERNED = 4096
# What one 64-bit block-hash key costs beyond its dict slot (an int object of 3 digits).
_KEY_BYTES = sys.getsizeof(1 << 63)

Holder = tuple[str, str]
"""``(endpoint, medium)``: the unit a bit in a block's holder mask stands for."""


class BlockOpKind(IntEnum):
    STORED = 0
    REMOVED = 1
    CLEARED = 2


class BlockOp(NamedTuple):
    """One change to an endpoint's cached blocks, in the form a shard applies it.

    The subscriber turns each KV event into at most one op per shard, holding only that
    shard's hashes (in chain order). ``CLEARED`` drops everything the endpoint holds
    (``AllBlocksCleared``, or a resync after lost events); it ignores hashes and medium.
    A NamedTuple because ops cross actor boundaries by the thousand and pickle compactly.
    """

    kind: BlockOpKind
    hashes: Sequence[int] = ()
    medium: str = DEFAULT_MEDIUM


class BlockIndex:
    """Block hash -> holders (endpoint, medium) with last-stored time, bounded by LRU.

    Blocks are recorded tail first and touched tail first (for stores and for lookup
    hits), so within a chain the first block is the most recently used and eviction cuts a
    prefix from its end: evicting a chain's head would orphan every later block, since a
    prefix match starts at block 0. The engines free blocks in the same order.

    Eviction works in batches of ``max_blocks // 64`` beyond the bound: dropping the front
    of a dict one key at a time rescans the dead slots left by earlier deletions, so the
    index holds between ~98.4% and 100% of ``max_blocks`` once full.
    """

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._evict_slack = max_blocks // 64
        self._blocks: dict[int, int] = {}
        self._interned: dict[int, int] = {}
        self._holder_ids: dict[Holder, int] = {}
        self._holders: list[Holder | None] = []
        self._free_ids: list[int] = []  # a heap: reusing the lowest id keeps masks small
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    # -- holder ids -------------------------------------------------------------------

    def holders(self) -> list[Holder | None]:
        """The holder each mask bit stands for (None: a free id); index = bit position."""
        return list(self._holders)

    def _holder_bit(self, endpoint: str, medium: str) -> int:
        holder = (endpoint, medium)
        holder_id = self._holder_ids.get(holder)
        if holder_id is None:
            if self._free_ids:
                holder_id = heapq.heappop(self._free_ids)
                self._holders[holder_id] = holder
            else:
                holder_id = len(self._holders)
                self._holders.append(holder)
            self._holder_ids[holder] = holder_id
        return 1 << holder_id

    def _intern(self, value: int) -> int:
        interned = self._interned.get(value)
        if interned is None:
            if len(self._interned) >= _MAX_INTERNED:
                self._interned.clear()
            self._interned[value] = interned = value
        return interned

    # -- changes ----------------------------------------------------------------------

    def apply(self, endpoint: str, ops: Iterable[BlockOp], now: float) -> None:
        """Apply one endpoint's ops in order; ``now`` (epoch seconds) stamps stored blocks."""
        for op in ops:
            if op.kind is BlockOpKind.STORED:
                self.store(endpoint, op.hashes, op.medium, now)
            elif op.kind is BlockOpKind.REMOVED:
                self.remove(endpoint, op.hashes, op.medium)
            else:
                self.drop_endpoint(endpoint)

    def store(self, endpoint: str, hashes: Sequence[int], medium: str, now: float) -> None:
        """``endpoint`` now holds ``hashes`` (chain order) on ``medium``; they become most recent."""
        if not hashes:
            return
        bit = self._holder_bit(endpoint, medium) << _TIME_BITS
        stamp = int(now) & _TIME_MASK
        blocks = self._blocks
        pop = blocks.pop
        intern = self._intern
        for block_hash in reversed(hashes):
            value = pop(block_hash, 0)
            blocks[block_hash] = intern((value & ~_TIME_MASK) | bit | stamp)
        if len(blocks) > self.max_blocks:
            self._evict(len(blocks) - self.max_blocks + self._evict_slack)

    def remove(self, endpoint: str, hashes: Iterable[int], medium: str) -> None:
        """``endpoint`` no longer holds ``hashes`` on ``medium``; unknown hashes are ignored."""
        holder_id = self._holder_ids.get((endpoint, medium))
        if holder_id is None:
            return
        self._clear_bits(hashes, 1 << (holder_id + _TIME_BITS))

    def drop_endpoint(self, endpoint: str) -> None:
        """Forget every block ``endpoint`` holds, on every medium, and free its holder ids.

        A full scan: it runs when an endpoint leaves, restarts its cache or loses events,
        not on a request's path.
        """
        ids = [holder_id for (name, _), holder_id in self._holder_ids.items() if name == endpoint]
        if not ids:
            return
        mask = sum(1 << (holder_id + _TIME_BITS) for holder_id in ids)
        self._clear_bits([block_hash for block_hash, value in self._blocks.items() if value & mask], mask)
        for holder_id in ids:
            holder = self._holders[holder_id]
            assert holder is not None
            del self._holder_ids[holder]
            self._holders[holder_id] = None
            heapq.heappush(self._free_ids, holder_id)

    def _clear_bits(self, hashes: Iterable[int], mask: int) -> None:
        """Clear ``mask`` (already shifted) from ``hashes``; a block left with no holder goes.

        The order is kept: losing a holder is not a use.
        """
        blocks = self._blocks
        intern = self._intern
        for block_hash in hashes:
            value = blocks.get(block_hash)
            if value is None or not value & mask:
                continue
            value &= ~mask
            if value >> _TIME_BITS:
                blocks[block_hash] = intern(value)
            else:
                del blocks[block_hash]

    def _evict(self, count: int) -> None:
        blocks = self._blocks
        for block_hash in list(islice(blocks, count)):
            del blocks[block_hash]
        self.evicted += count

    # -- queries ----------------------------------------------------------------------

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Per hash, the mask of holder ids holding it (0: unknown); hits become most recent.

        Decode bits with ``holders()``. A hit counts as a use because engines emit no event
        when they reuse a cached block: without it a hot system prompt stored long ago would
        be the first thing the index evicts.
        """
        blocks = self._blocks
        masks = [blocks.get(block_hash, 0) >> _TIME_BITS for block_hash in hashes]
        pop = blocks.pop
        for block_hash, mask in zip(reversed(hashes), reversed(masks)):
            if mask:
                blocks[block_hash] = pop(block_hash)
        return masks

    def last_stored(self, block_hash: int) -> int | None:
        """When ``block_hash`` was last stored by any holder (epoch seconds), None if unknown."""
        value = self._blocks.get(block_hash)
        return None if value is None else value & _TIME_MASK

    def estimated_bytes(self) -> int:
        """The dict's table plus one key int per block; interned values are shared and small."""
        return sys.getsizeof(self._blocks) + len(self._blocks) * _KEY_BYTES


def holders_of_mask(mask: int, holders: Sequence[Holder | None]) -> frozenset[str]:
    """The endpoints a lookup mask names (any medium), given the shard's ``holders()`` table."""
    names = set()
    while mask:
        low = mask & -mask
        holder = holders[low.bit_length() - 1]
        if holder is not None:
            names.add(holder[0])
        mask ^= low
    return frozenset(names)


def longest_prefix(
    hashes: Sequence[int], holders_of: Mapping[int, AbstractSet[str]], endpoints: Iterable[str]
) -> dict[str, int]:
    """Per endpoint, how many leading blocks of the chain ``hashes`` it holds.

    ``holders_of`` maps a hash to the endpoints holding it (missing: nobody), merged from
    every shard. A block only helps if all blocks before it are held too, so each
    endpoint's count is its first miss; the scan stops once no endpoint is still matching.
    """
    matched = dict.fromkeys(endpoints, 0)
    remaining = set(matched)
    depth = 0
    for block_hash in hashes:
        holding = remaining.intersection(holders_of.get(block_hash, ()))
        for name in remaining - holding:
            matched[name] = depth
        remaining = holding
        if not remaining:
            return matched
        depth += 1
    for name in remaining:
        matched[name] = depth
    return matched


def op_of_event(event: KVEvent) -> BlockOp:
    """One engine event as the op that applies it to a (single, unsharded) index."""
    if isinstance(event, BlockStored):
        return BlockOp(BlockOpKind.STORED, event.block_hashes, event.medium or DEFAULT_MEDIUM)
    if isinstance(event, BlockRemoved):
        return BlockOp(BlockOpKind.REMOVED, event.block_hashes, event.medium or DEFAULT_MEDIUM)
    return BlockOp(BlockOpKind.CLEARED)


def match_in(index: BlockIndex, hashes: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]:
    """Per endpoint, the leading blocks of ``hashes`` one index says it holds."""
    holders = index.holders()
    holders_of = {h: holders_of_mask(mask, holders) for h, mask in zip(hashes, index.lookup(hashes)) if mask}
    return longest_prefix(hashes, holders_of, endpoints)
