"""``rayfleet bench kvindex``: the simulated engines' fill as subscribers send it, and the
command end to end on tiny sizes, in a subprocess with a Ray cluster of its own."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from bench.kvindex import (
    PROMPTS_PER_GROUP,
    QUESTION_BLOCKS,
    SYSTEM_BLOCKS,
    KVIndexRow,
    build_fill,
    lookup_prompts,
    measure_in_process,
)
from kvcache.hashing import BlockHasher
from kvcache.index import BlockOpKind
from kvcache.shard import shard_of
from tests.test_stack import cli, user_env

pytestmark = pytest.mark.timeout(240)

ENDPOINTS = [f"engine-{i}" for i in range(4)]


def test_fill_stores_exactly_the_requested_blocks_in_subscriber_order() -> None:
    blocks, shards = 5000, 3
    fill = build_fill(blocks, shards, ENDPOINTS, BlockHasher("xxhash"), events_per_call=8)
    holders: defaultdict[int, set[str]] = defaultdict(set)
    seqs: defaultdict[tuple[str, int], list[int]] = defaultdict(list)
    for call in fill.calls:
        seqs[call.endpoint, call.shard].append(call.seq)
        assert 0 < len(call.ops) <= 8
        for op in call.ops:
            assert op.kind is BlockOpKind.STORED
            assert all(shard_of(block_hash, shards) == call.shard for block_hash in op.hashes)
            for block_hash in op.hashes:
                holders[block_hash].add(call.endpoint)
    assert len(holders) == blocks
    assert sum(len(op.hashes) for call in fill.calls for op in call.ops) == fill.entries
    assert all(seq == list(range(1, len(seq) + 1)) for seq in seqs.values())  # 0 is the opening replace
    # A group's system prompt is held by two endpoints, a question by the one that served it.
    shared = len(fill.groups) * SYSTEM_BLOCKS
    assert Counter(map(len, holders.values())) == {2: shared, 1: blocks - shared}
    per_group = Counter(group for group, _ in fill.prompts)
    assert [per_group[group] for group in range(len(fill.groups) - 1)] == [PROMPTS_PER_GROUP] * (len(fill.groups) - 1)


def test_in_process_answers_cover_hits_shared_prefixes_and_misses() -> None:
    hasher = BlockHasher("xxhash")
    fill = build_fill(20_000, 2, ENDPOINTS, hasher, events_per_call=256)
    pool = lookup_prompts(fill, hasher, seed=0)
    assert all(len(hashes) == SYSTEM_BLOCKS + QUESTION_BLOCKS for hashes in pool)
    _, _, cases = measure_in_process(fill, 20_000, pool, ENDPOINTS, lookups=10)
    best = Counter(max(case.expected.values()) for case in cases)
    assert set(best) == {0, SYSTEM_BLOCKS, SYSTEM_BLOCKS + QUESTION_BLOCKS}
    assert best[SYSTEM_BLOCKS + QUESTION_BLOCKS] == len(pool) // 2 and best[0] == len(pool) // 4


def test_command_reports_every_size(tmp_path: Path) -> None:
    out = tmp_path / "kvindex.json"
    result = cli(
        "bench", "kvindex", "--blocks", "2000,5k", "--shards", "2", "--lookups", "300", "--concurrency", "8",
        "--hash-algo", "xxhash", "--out", str(out), env=user_env(tmp_path), timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| blocks | shards | bytes_per_block |" in result.stdout
    report = json.loads(out.read_text())
    assert report["bench"] == "kvindex" and report["notes"] and report["meta"]["endpoints"] == 8
    rows = [KVIndexRow.model_validate(row) for row in report["rows"]]
    assert [(row.blocks, row.shards) for row in rows] == [(2000, 2), (5000, 2)]
    for row in rows:
        assert 20 <= row.bytes_per_block <= 2000
        assert row.lookups_per_s > 0 and row.events_per_s > 0 and row.pure_lookups_per_s > 0
        assert 0 < row.lookup_p50_s <= row.lookup_p99_s


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--shards", "0"], "--shards"), (["--blocks", "lots"], "--blocks"), (["--budget", "0"], "--budget")],
)
def test_usage_errors_are_one_line(tmp_path: Path, argv: list[str], flag: str) -> None:
    result = cli("bench", "kvindex", *argv, env=user_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and flag in result.stderr
