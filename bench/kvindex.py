"""``rayfleet bench kvindex``: the KV-event prefix index at scale (1M and 10M blocks).

For each index size it measures what the design has to hold up to: memory per block,
how fast shards ingest the engines' KV events, and how fast and how predictably the
gateway gets a 2,048-token prompt's answer (128 block hashes) from the shards.

How a run goes, per size:

1. Simulated engines fill their caches: groups of 16 prompts share a 512-token system
   prompt (32 blocks) and add a unique 1,536-token question (96 blocks); a group is
   served by 2 of the 8 endpoints, so system-prompt blocks have two holders. Hashes are
   vLLM's chained block hashes (``kvcache.hashing``), until the index holds exactly the
   requested number of distinct blocks.
2. The same stored blocks go into one in-process ``BlockIndex`` (no Ray): a single core's
   ingest and lookup capacity, and the answers every Ray lookup must match exactly.
3. Shard actors on a fresh local Ray cluster get the blocks as the subscribers send them:
   one op per event and shard, numbered per (endpoint, shard), up to ``MAX_DRAIN`` events
   per call (a subscriber's batch when its socket is backed up), many calls in flight.
4. A gateway-like asyncio client (``KVIndexClient``, one process, like one gateway
   replica) looks up prompts: half were stored, a quarter share a stored system prompt
   with a new question, a quarter are new. Closed loop at concurrency 1 (latency) and at
   ``--concurrency`` (throughput).

Every shard, the sender and the lookup client share this machine's cores, so per-shard
rates are what each shard got of them, not what a shard on its own core would do; the
in-process figures give the single-core ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from bench.errors import BenchUsageError
from bench.stats import BenchReport, Distribution
from bench.tables import format_table
from kvcache.hashing import DEFAULT_BLOCK_SIZE, DEFAULT_HASH_ALGO, HASH_ALGOS, BlockHasher
from kvcache.index import DEFAULT_MEDIUM, BlockIndex, BlockOp, BlockOpKind, holders_of_mask, longest_prefix

if TYPE_CHECKING:  # Ray is imported when the benchmark runs, not whenever the CLI parses its arguments
    from ray.actor import ActorHandle

    from kvcache.client import KVIndexClient

SYSTEM_BLOCKS = 32  # a 512-token system prompt shared by a group
QUESTION_BLOCKS = 96  # plus a unique question: 128 blocks = a 2,048-token prompt
PROMPTS_PER_GROUP = 16
HOLDERS_PER_GROUP = 2  # endpoints a group's prompts are routed to, alternately
MAX_IN_FLIGHT_CALLS = 64  # apply calls awaiting their reply, over all simulated subscribers
LOOKUP_POOL = 1024  # distinct prompts the lookups cycle through
WARMUP_LOOKUPS = 200
VOCAB = 128_000
_SYSTEM_TAG, _QUESTION_TAG, _LOOKUP_TAG = 1, 2, 3
# Prompt text after a block's unique head; the chain makes every later block unique anyway.
_FILLER = [(i * 7919 + 13) % VOCAB for i in range((SYSTEM_BLOCKS + QUESTION_BLOCKS) * DEFAULT_BLOCK_SIZE)]


class KVIndexRow(BaseModel):
    """One index size. Latencies in seconds; rates per second."""

    blocks: int
    shards: int
    bytes_per_block: float  # the shards' own estimate (``ShardStats.bytes_estimate``)
    rss_bytes_per_block: float  # growth of the shard processes' RSS while filling
    lookups_per_s: float  # at ``lookup_concurrency``, from one client process
    lookup_p50_s: float  # at concurrency 1, as the gateway's await sees it
    lookup_p99_s: float
    loaded_p99_s: float  # at ``lookup_concurrency``
    lookup_concurrency: int
    lookup_timeouts: int  # lookups past ``--budget`` (the gateway would fall back)
    events_per_s: float  # stored-block entries applied per second per shard, all shards filling at once
    fill_s: float
    pure_events_per_s: float  # one in-process BlockIndex, no Ray
    pure_lookups_per_s: float


class KVIndexReport(BenchReport):
    rows: list[KVIndexRow]  # type: ignore[assignment]  # same JSON shape, this bench's columns


@dataclass(slots=True)
class ApplyCall:
    """One ``KVIndexShard.apply`` a subscriber would make: its ops for one shard."""

    endpoint: str
    shard: int
    seq: int
    ops: list[BlockOp]


@dataclass(slots=True)
class Fill:
    """What the simulated engines stored, as their subscribers send it."""

    calls: list[ApplyCall]
    entries: int  # stored-block entries (a block hash stored by one endpoint) over all calls
    groups: list[tuple[list[int], bytes]]  # per group: its system prompt's hashes and last digest
    prompts: list[tuple[int, list[int]]]  # per stored prompt: its group and its question's hashes


@dataclass(slots=True)
class LookupCase:
    hashes: list[int]
    expected: dict[str, int]  # the in-process index's answer


@dataclass(slots=True)
class LoopResult:
    latencies: list[float]
    timeouts: int = 0
    wrong: int = 0
    wall_s: float = 0.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tokens(tag: int, ident: int, blocks: int) -> list[int]:
    """Token ids unique to ``(tag, ident)`` in their first block."""
    return [tag, ident % VOCAB, ident // VOCAB, *_FILLER[3 : blocks * DEFAULT_BLOCK_SIZE]]


def _split(hashes: list[int], num_shards: int) -> list[list[int]]:
    from kvcache.shard import shard_of

    parts: list[list[int]] = [[] for _ in range(num_shards)]
    for block_hash in hashes:
        parts[shard_of(block_hash, num_shards)].append(block_hash)
    return parts


def build_fill(blocks: int, num_shards: int, endpoints: Sequence[str], hasher: BlockHasher, events_per_call: int) -> Fill:
    """Groups of prompts stored on their endpoints until exactly ``blocks`` distinct blocks exist.

    Each endpoint's events are batched per shard as its subscriber does, ``events_per_call``
    events a call, sequence numbers from 1 (0 is the replace that opens the feed).
    """
    outbox: dict[tuple[str, int], list[BlockOp]] = {}
    pending = dict.fromkeys(endpoints, 0)
    next_seq = {(endpoint, shard): 1 for endpoint in endpoints for shard in range(num_shards)}
    fill = Fill([], 0, [], [])

    def flush(endpoint: str) -> None:
        for shard in range(num_shards):
            ops = outbox.pop((endpoint, shard), None)
            if ops:
                fill.calls.append(ApplyCall(endpoint, shard, next_seq[endpoint, shard], ops))
                next_seq[endpoint, shard] += 1
        pending[endpoint] = 0

    unique = 0
    while unique < blocks:
        group = len(fill.groups)
        system: list[int] = []
        digest = hasher.extend(system, None, _tokens(_SYSTEM_TAG, group, SYSTEM_BLOCKS), min(SYSTEM_BLOCKS, blocks - unique))
        assert digest is not None
        unique += len(system)
        fill.groups.append((system, digest))
        system_parts = _split(system, num_shards)
        for turn in range(PROMPTS_PER_GROUP):
            if turn and unique >= blocks:
                break
            question: list[int] = []
            hasher.extend(question, digest, _tokens(_QUESTION_TAG, len(fill.prompts), QUESTION_BLOCKS),
                          min(QUESTION_BLOCKS, blocks - unique))  # fmt: skip
            unique += len(question)
            fill.prompts.append((group, question))
            endpoint = endpoints[(group + turn % HOLDERS_PER_GROUP) % len(endpoints)]
            for shard, question_part in enumerate(_split(question, num_shards)):
                hashes = system_parts[shard] + question_part
                if hashes:
                    outbox.setdefault((endpoint, shard), []).append(BlockOp(BlockOpKind.STORED, hashes, DEFAULT_MEDIUM))
                    fill.entries += len(hashes)
            pending[endpoint] += 1
            if pending[endpoint] == events_per_call:
                flush(endpoint)
    for endpoint in endpoints:
        flush(endpoint)
    return fill


def lookup_prompts(fill: Fill, hasher: BlockHasher, seed: int) -> list[list[int]]:
    """Half stored prompts, a quarter a stored system prompt with a new question, a quarter new."""
    rng = random.Random(seed)
    pool = []
    for k in range(LOOKUP_POOL):
        if k % 2 == 0:
            group, question = rng.choice(fill.prompts)
            pool.append(fill.groups[group][0] + question)
        elif k % 4 == 1:
            system, digest = rng.choice(fill.groups)
            question = []
            hasher.extend(question, digest, _tokens(_LOOKUP_TAG, k, QUESTION_BLOCKS), QUESTION_BLOCKS)
            pool.append(system + question)
        else:
            pool.append(hasher.chain(_tokens(_LOOKUP_TAG, k, SYSTEM_BLOCKS + QUESTION_BLOCKS)))
    rng.shuffle(pool)
    return pool


def _answer(index: BlockIndex, hashes: list[int], endpoints: Sequence[str]) -> dict[str, int]:
    """``KVIndexClient.lookup``'s answer, from one in-process index."""
    masks, holders = index.lookup(hashes), index.holders()
    decoded = {mask: holders_of_mask(mask, holders) for mask in set(masks) if mask}  # masks repeat along a prompt
    return longest_prefix(hashes, {block_hash: decoded[mask] for block_hash, mask in zip(hashes, masks) if mask}, endpoints)


def measure_in_process(
    fill: Fill, blocks: int, pool: list[list[int]], endpoints: Sequence[str], lookups: int
) -> tuple[float, float, list[LookupCase]]:
    """Ingest and lookup rates of one ``BlockIndex`` in this process, and its answers for ``pool``."""
    index = BlockIndex(blocks)
    now = time.time()
    start = time.perf_counter()
    for call in fill.calls:
        index.apply(call.endpoint, call.ops, now)
    events_per_s = fill.entries / (time.perf_counter() - start)
    if len(index) != blocks or index.evicted:
        raise RuntimeError(f"the in-process index holds {len(index)} blocks, {index.evicted} evicted; expected {blocks}")
    cases = [LookupCase(hashes, _answer(index, hashes, endpoints)) for hashes in pool]
    start = time.perf_counter()
    for i in range(lookups):
        _answer(index, pool[i % len(pool)], endpoints)
    return events_per_s, lookups / (time.perf_counter() - start), cases


def _rss_bytes(pid: int) -> int:
    """A local process's resident set (psutil is not among the dependencies)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _actor_pid(handle: ActorHandle) -> int:
    """The actor's worker process, from the GCS actor table: Ray's public state API needs
    the dashboard, which this benchmark does not start."""
    from ray._private import state

    return int(state.actors(handle._actor_id.hex())["Pid"])


def fill_shards(handles: Sequence[ActorHandle], fill: Fill, endpoints: Sequence[str]) -> float:
    """Open every (endpoint, shard) feed with an empty replace, then send the ops; seconds taken by the ops."""
    import ray

    opened = ray.get([h.replace.remote(endpoint, endpoint, 0, []) for endpoint in endpoints for h in handles])
    if not all(opened):
        raise RuntimeError("a shard refused a new feed's first replace")
    in_flight: deque[ray.ObjectRef] = deque()
    refused = 0
    start = time.perf_counter()
    for call in fill.calls:
        in_flight.append(handles[call.shard].apply.remote(call.endpoint, call.endpoint, call.seq, call.ops))
        if len(in_flight) >= MAX_IN_FLIGHT_CALLS:
            refused += not ray.get(in_flight.popleft())
    refused += sum(not in_sync for in_sync in ray.get(list(in_flight)))
    elapsed = time.perf_counter() - start
    if refused:
        raise RuntimeError(f"shards asked for a replace on {refused} op batches: they fell out of sequence")
    return elapsed


async def closed_loop(
    client: KVIndexClient, cases: Sequence[LookupCase], endpoints: Sequence[str], count: int, concurrency: int,
    budget_s: float,
) -> LoopResult:  # fmt: skip
    """``count`` lookups from ``concurrency`` tasks, each sending its next as its last returns."""
    result = LoopResult([])
    issued = 0

    async def client_task() -> None:
        nonlocal issued
        while issued < count:
            case = cases[issued % len(cases)]
            issued += 1
            start = time.perf_counter()
            answer = await client.lookup(case.hashes, endpoints, budget_s)
            result.latencies.append(time.perf_counter() - start)
            if answer is None:
                result.timeouts += 1
            elif answer != case.expected:
                result.wrong += 1

    start = time.perf_counter()
    await asyncio.gather(*(client_task() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


async def measure_lookups(
    handles: Sequence[ActorHandle], cases: Sequence[LookupCase], endpoints: Sequence[str], args: argparse.Namespace
) -> tuple[LoopResult, LoopResult]:
    """Concurrency 1 (latency), then ``args.concurrency`` (throughput), after a warm-up."""
    from kvcache.client import KVIndexClient

    client = KVIndexClient(handles)
    await closed_loop(client, cases, endpoints, WARMUP_LOOKUPS, args.concurrency, args.budget)
    single = await closed_loop(client, cases, endpoints, args.lookups, 1, args.budget)
    loaded = await closed_loop(client, cases, endpoints, args.lookups, args.concurrency, args.budget)
    wrong = single.wrong + loaded.wrong
    if wrong:
        raise RuntimeError(f"{wrong} lookups through the shards disagree with the in-process index")
    return single, loaded


def measure(blocks: int, args: argparse.Namespace, endpoints: Sequence[str]) -> KVIndexRow:
    import ray

    from kvcache.shard import KVIndexShard
    from kvcache.subscriber import MAX_DRAIN

    hasher = BlockHasher(args.hash_algo)
    start = time.perf_counter()
    fill = build_fill(blocks, args.shards, endpoints, hasher, MAX_DRAIN)
    pool = lookup_prompts(fill, hasher, args.seed)
    _log(f"  {blocks:,} blocks: {len(fill.prompts):,} prompts, {fill.entries:,} stored-block entries in "
         f"{len(fill.calls):,} calls, hashed in {time.perf_counter() - start:.1f} s")  # fmt: skip
    pure_events_per_s, pure_lookups_per_s, cases = measure_in_process(fill, blocks, pool, endpoints, args.lookups)
    gc.collect()  # the in-process index is gone; do not let its memory count against the shards'
    _log(f"  in-process: {pure_events_per_s:,.0f} entries/s, {pure_lookups_per_s:,.0f} lookups/s")
    handles = [KVIndexShard.remote(shard, blocks) for shard in range(args.shards)]
    try:
        ray.get([h.stats.remote() for h in handles])
        pids = [_actor_pid(h) for h in handles]
        rss_before = [_rss_bytes(pid) for pid in pids]
        fill_s = fill_shards(handles, fill, endpoints)
        stats = ray.get([h.stats.remote() for h in handles])
        rss_growth = sum(_rss_bytes(pid) for pid in pids) - sum(rss_before)
        held = sum(s.blocks for s in stats)
        if held != blocks or any(s.evicted for s in stats):
            raise RuntimeError(f"the shards hold {held} blocks ({sum(s.evicted for s in stats)} evicted), expected {blocks}")
        events_per_s = fill.entries / fill_s / args.shards
        _log(f"  shards filled in {fill_s:.1f} s: {events_per_s:,.0f} entries/s per shard; "
             f"{', '.join(f'{s.blocks:,}' for s in stats)} blocks")  # fmt: skip
        del fill
        gc.collect()
        single, loaded = asyncio.run(measure_lookups(handles, cases, endpoints, args))
    finally:
        for h in handles:
            ray.kill(h)
    single_latency, loaded_latency = Distribution.of(single.latencies), Distribution.of(loaded.latencies)
    assert single_latency.p50 is not None and single_latency.p99 is not None and loaded_latency.p99 is not None
    row = KVIndexRow(
        blocks=blocks,
        shards=args.shards,
        bytes_per_block=sum(s.bytes_estimate for s in stats) / blocks,
        rss_bytes_per_block=rss_growth / blocks,
        lookups_per_s=len(loaded.latencies) / loaded.wall_s,
        lookup_p50_s=single_latency.p50,
        lookup_p99_s=single_latency.p99,
        loaded_p99_s=loaded_latency.p99,
        lookup_concurrency=args.concurrency,
        lookup_timeouts=single.timeouts + loaded.timeouts,
        events_per_s=events_per_s,
        fill_s=fill_s,
        pure_events_per_s=pure_events_per_s,
        pure_lookups_per_s=pure_lookups_per_s,
    )
    _log(f"  lookups: p50 {row.lookup_p50_s * 1e3:.2f} ms, p99 {row.lookup_p99_s * 1e3:.2f} ms at 1; "
         f"{row.lookups_per_s:,.0f}/s at {args.concurrency}")  # fmt: skip
    return row


def _counts(text: str) -> list[int]:
    """``1000000,10M,500k`` -> block counts."""
    scale = {"k": 1_000, "m": 1_000_000}
    counts = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        try:
            counts.append(int(float(item[:-1]) * scale[item[-1]]) if item[-1] in scale else int(item))
        except ValueError:
            raise BenchUsageError(f"--blocks takes comma-separated counts like 1M,10M or 100000, got {text!r}")
    if not counts or min(counts) < 1:
        raise BenchUsageError(f"--blocks needs positive counts, got {text!r}")
    return counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "kvindex",
        help="the KV-event prefix index at 1M and 10M blocks: memory per block, ingest rate, lookup rate and latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--blocks", default="1M,10M", help="index sizes in distinct blocks (default %(default)s)")
    parser.add_argument("--shards", type=int, default=4, help="index shard actors (default %(default)s)")
    parser.add_argument("--endpoints", type=int, default=8, help="simulated engines (default %(default)s)")
    parser.add_argument("--lookups", type=int, default=5000, help="lookups per concurrency level (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="lookups in flight for the throughput run")
    parser.add_argument("--budget", type=float, default=1.0, help="lookup budget in seconds, as the gateway passes it")
    parser.add_argument("--hash-algo", choices=HASH_ALGOS, default=DEFAULT_HASH_ALGO, help="vLLM's prefix-caching hash")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="under 3 minutes: 100k and 1M blocks, 2,000 lookups")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.set_defaults(bench_run=run)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.blocks, args.lookups = "100k,1M", min(args.lookups, 2000)
    sizes = _counts(args.blocks)
    for flag, value in (("--shards", args.shards), ("--endpoints", args.endpoints), ("--lookups", args.lookups),
                        ("--concurrency", args.concurrency)):  # fmt: skip
        if value < 1:
            raise BenchUsageError(f"{flag} must be >= 1, got {value}")
    if args.budget <= 0:
        raise BenchUsageError(f"--budget is in seconds and must be > 0, got {args.budget}")
    import ray

    from kvcache.subscriber import MAX_DRAIN
    from serve_apps.registry import NAMESPACE

    endpoints = [f"engine-{i}" for i in range(args.endpoints)]
    started, load_before = time.monotonic(), os.getloadavg()[0]
    # address="local": a cluster of its own, never a running `rayfleet up` one sharing the cores.
    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)  # fmt: skip
    rows = []
    try:
        for blocks in sizes:
            _log(f"bench kvindex: {blocks:,} blocks over {args.shards} shards")
            rows.append(measure(blocks, args, endpoints))
    finally:
        ray.shutdown()
    notes = [
        (f"workload: {args.endpoints} endpoints; prompts of {SYSTEM_BLOCKS + QUESTION_BLOCKS} blocks "
         f"({(SYSTEM_BLOCKS + QUESTION_BLOCKS) * DEFAULT_BLOCK_SIZE} tokens), {PROMPTS_PER_GROUP} per group sharing a "
         f"{SYSTEM_BLOCKS}-block system prompt, a group on {HOLDERS_PER_GROUP} endpoints; {args.hash_algo} block hashes"),
        ("events_per_s: stored-block entries (one block hash of a BlockStored event, for one engine) applied per second "
         f"per shard, all shards filling at once, up to {MAX_DRAIN} events per call and {MAX_IN_FLIGHT_CALLS} "
         "calls in flight; shards, sender and client share this machine's cores"),
        ("bytes_per_block: the shards' own estimate (dict table + key ints); rss_bytes_per_block: the shard "
         "processes' RSS growth while filling (noisy below ~100k blocks per shard)"),
        (f"lookups: one asyncio client process (like one gateway replica) via KVIndexClient, budget {args.budget:g} s; "
         f"p50/p99 at concurrency 1, lookups_per_s and loaded_p99_s at {args.concurrency}; half the prompts stored, "
         "a quarter sharing a stored system prompt, a quarter new; every answer checked against the in-process index"),
        "pure_*: one in-process BlockIndex holding every block, no Ray (a single core's ceiling)",
        (f"took {time.monotonic() - started:.0f} s; 1-minute load average {load_before:.1f} before, "
         f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores (anything else running skews every figure)"),
    ]  # fmt: skip
    print(format_table(rows))
    print("\n".join(notes))
    if args.out:
        meta = {"endpoints": args.endpoints, "hash_algo": args.hash_algo, "budget_s": args.budget, "seed": args.seed,
                "system_blocks": SYSTEM_BLOCKS, "question_blocks": QUESTION_BLOCKS,
                "prompts_per_group": PROMPTS_PER_GROUP, "holders_per_group": HOLDERS_PER_GROUP}  # fmt: skip
        KVIndexReport(bench="kvindex", rows=rows, notes=notes, meta=meta).write(args.out)
    return 0
