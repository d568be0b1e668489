"""The gateway's side of the prefix index: find the shards, ask them about a prompt in time.

A lookup fans out to every shard that owns one of the prompt's blocks at once and
combines the answers into "leading blocks held" per endpoint. It never waits past its
budget: the gateway would rather route on its local approximation than hold a request
on a slow or restarting shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ray.actor import ActorHandle
from ray.exceptions import RayError

from kvcache.index import holders_of_mask, longest_prefix
from kvcache.shard import KVIndexShard, LookupReply, shard_of
from serve_apps.registry import NAMESPACE

SHARD_NAME = "rayfleet-kv-index-shard-{}"


def ensure_index(num_shards: int, max_blocks_per_shard: int) -> list[ActorHandle]:
    """The cluster's index shards, created on first use (detached, so they outlive gateways).

    Shards that already exist keep the size they were created with.
    """
    return [
        KVIndexShard.options(
            name=SHARD_NAME.format(shard), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote(shard, max_blocks_per_shard)
        for shard in range(num_shards)
    ]


class KVIndexClient:
    """Longest-prefix lookups over the shards, bounded by a time budget."""

    def __init__(self, shards: Sequence[ActorHandle]) -> None:
        if not shards:
            raise ValueError("the index needs at least one shard")
        self._shards = list(shards)

    async def lookup(self, hashes: Sequence[int], endpoints: Sequence[str], budget_s: float) -> dict[str, int] | None:
        """Per endpoint, how many leading blocks of the chain ``hashes`` it holds.

        None when the shards did not all answer within ``budget_s`` (or one failed): the
        caller falls back to its local index and counts the miss. Calls still running are
        abandoned, not cancelled; they are cheap reads.
        """
        if not hashes:
            return dict.fromkeys(endpoints, 0)
        num_shards = len(self._shards)
        per_shard: list[list[int]] = [[] for _ in range(num_shards)]
        for block_hash in hashes:
            per_shard[shard_of(block_hash, num_shards)].append(block_hash)
        asked = [(shard, shard_hashes) for shard, shard_hashes in enumerate(per_shard) if shard_hashes]
        calls = [self._shards[shard].lookup.remote(shard_hashes) for shard, shard_hashes in asked]
        try:
            replies: list[LookupReply] = await asyncio.wait_for(asyncio.gather(*calls), budget_s)
        except (TimeoutError, RayError):
            return None
        holders_of: dict[int, frozenset[str]] = {}
        for (_, shard_hashes), reply in zip(asked, replies):
            decoded: dict[int, frozenset[str]] = {}  # masks repeat along a prompt
            for block_hash, mask in zip(shard_hashes, reply.masks):
                if mask:
                    names = decoded.get(mask)
                    if names is None:
                        names = decoded[mask] = holders_of_mask(mask, reply.holders)
                    holders_of[block_hash] = names
        return longest_prefix(hashes, holders_of, endpoints)
