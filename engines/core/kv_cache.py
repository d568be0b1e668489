"""vLLM V1's paged KV cache with automatic prefix caching, as block bookkeeping only.

Blocks hold ``block_size`` tokens. A full block is identified by a chain hash of its
tokens, its parent block's hash and the LoRA name, so equal hashes mean equal prefixes. Freed
blocks keep their hash and stay findable until their physical block is handed out again;
the free queue is in LRU order and a finished request's blocks join it tail first, so the
end of a prompt is evicted before its (more shareable) beginning, as in vLLM.

The hashes are vLLM's own (``kvcache.hashing``, with the algorithm and seed the engine is
configured with), so a gateway can compute them from a prompt, and the events are vLLM's KV
events (``rayfleet.protocol.kv_events``), so a KV-aware router sees the simulator exactly as
it would see vLLM.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcache.hashing import BlockHasher, lora_extra_keys
from rayfleet.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# vLLM's one KV cache group of a plain decoder, as its events name it.
KV_CACHE_GROUP = 0
KV_CACHE_SPEC_KIND = "full_attention"


@dataclass(slots=True)
class RequestBlocks:
    """One request's view of the cache; owned by the request, mutated only by the manager."""

    lora_id: int = 0  # vLLM's adapter id, reported in events; 0 for the base model
    lora_name: str | None = None  # the adapter name, which vLLM hashes
    block_ids: list[int] = field(default_factory=list)
    # Chain hashes (event form) of the request's full blocks, computed lazily; kept across
    # preemption since they depend only on the tokens. The chain continues from last_hash,
    # the full digest of the last of them.
    block_hashes: list[int] = field(default_factory=list)
    last_hash: bytes | None = None
    num_cached_blocks: int = 0  # leading block_ids already registered in the prefix cache


class KVCacheManager:
    """Allocation, prefix lookup, caching and eviction over ``num_blocks`` physical blocks."""

    def __init__(self, num_blocks: int, hasher: BlockHasher, enable_prefix_caching: bool, record_events: bool) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = hasher.block_size
        self._hasher = hasher
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        # LRU free queue: allocation pops the head, freeing appends to the tail, and a
        # prefix hit on a free block unlinks it from the middle; OrderedDict does all in O(1).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> a physical block holding it
        # Further blocks holding an already-cached hash: two requests computed the same
        # block (the last prompt block is always recomputed). They stay findable once the
        # first copy is evicted, as in vLLM's hash -> {block_id: block} map.
        self._duplicates: dict[int, list[int]] = {}
        self._events: list[KVEvent] | None = [] if record_events else None

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests; free cached blocks count as free, like vLLM."""
        return 1.0 - len(self._free) / self.num_blocks

    def find_cached_prefix(self, request: RequestBlocks, token_ids: Sequence[int]) -> list[int]:
        """Physical blocks holding the longest cached prefix of ``token_ids``.

        At least the last token is left out: vLLM must compute one token to get logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        self._extend_hashes(request, token_ids, max_blocks)
        cached = self._cached
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(
        self,
        request: RequestBlocks,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        hit_blocks: Sequence[int] = (),
    ) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` after ``num_computed_tokens``; False if short.

        ``num_computed_tokens`` includes the prefix hit of ``hit_blocks``, which the
        request takes over first. Free hit blocks leave the free queue, so they count
        against the free blocks just like new ones. Blocks that will be full once this
        step's tokens are computed are registered in the prefix cache now, so a request
        scheduled later in the same step can already share them (vLLM does the same).
        """
        ref_counts = self._ref_counts
        block_ids = request.block_ids
        num_total_blocks = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        num_new_blocks = num_total_blocks - len(block_ids) - len(hit_blocks)
        num_free_hits = sum(1 for block_id in hit_blocks if ref_counts[block_id] == 0) if hit_blocks else 0
        if num_new_blocks + num_free_hits > len(self._free):
            return False
        if hit_blocks:
            for block_id in hit_blocks:
                if ref_counts[block_id] == 0:
                    del self._free[block_id]
                ref_counts[block_id] += 1
            block_ids.extend(hit_blocks)
            request.num_cached_blocks = len(block_ids)
        for _ in range(num_new_blocks):
            block_id = self._free.popitem(last=False)[0]
            if self._block_hashes[block_id] is not None:
                self._evict(block_id)
            ref_counts[block_id] = 1
            block_ids.append(block_id)
        if self.enable_prefix_caching:
            num_full_blocks = (num_computed_tokens + num_new_tokens) // self.block_size
            if num_full_blocks > request.num_cached_blocks:
                self._cache_full_blocks(request, token_ids, num_full_blocks)
        return True

    def free(self, request: RequestBlocks) -> None:
        """Release the request's blocks, tail first, so its last blocks are evicted first."""
        ref_counts = self._ref_counts
        free = self._free
        for block_id in reversed(request.block_ids):
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                free[block_id] = None
        request.block_ids.clear()
        request.num_cached_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use, as in vLLM."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._duplicates.clear()
        self._block_hashes = [None] * self.num_blocks
        if self._events is not None:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events since the last call; always empty unless recording."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _extend_hashes(self, request: RequestBlocks, token_ids: Sequence[int], num_blocks: int) -> None:
        if len(request.block_hashes) < num_blocks:
            request.last_hash = self._hasher.extend(
                request.block_hashes, request.last_hash, token_ids, num_blocks, lora_extra_keys(request.lora_name)
            )

    def _cache_full_blocks(self, request: RequestBlocks, token_ids: Sequence[int], num_full_blocks: int) -> None:
        self._extend_hashes(request, token_ids, num_full_blocks)
        first = request.num_cached_blocks
        hashes = request.block_hashes
        cached = self._cached
        for index in range(first, num_full_blocks):
            block_id = request.block_ids[index]
            block_hash = hashes[index]
            self._block_hashes[block_id] = block_hash
            if block_hash in cached:
                self._duplicates.setdefault(block_hash, []).append(block_id)
            else:
                cached[block_hash] = block_id
        request.num_cached_blocks = num_full_blocks
        if self._events is not None:
            size = self.block_size
            self._events.append(
                BlockStored(
                    block_hashes=hashes[first:num_full_blocks],
                    parent_block_hash=hashes[first - 1] if first else None,
                    token_ids=list(token_ids[first * size : num_full_blocks * size]),
                    block_size=size,
                    lora_id=request.lora_id or None,
                    lora_name=request.lora_name,
                    extra_keys=[lora_extra_keys(request.lora_name)] * (num_full_blocks - first),
                    group_idx=KV_CACHE_GROUP,
                    kv_cache_spec_kind=KV_CACHE_SPEC_KIND,
                )
            )

    def _evict(self, block_id: int) -> None:
        """Drop a free cached block from the cache because its physical block is reused."""
        block_hash = self._block_hashes[block_id]
        self._block_hashes[block_id] = None
        copies = self._duplicates.get(block_hash)
        if self._cached.get(block_hash) == block_id:
            if copies:
                self._cached[block_hash] = copies.pop()
            else:
                del self._cached[block_hash]
        elif copies:
            copies.remove(block_id)
        if copies is not None and not copies:
            del self._duplicates[block_hash]
        if self._events is not None:
            self._events.append(BlockRemoved(block_hashes=[block_hash], group_idx=KV_CACHE_GROUP))
