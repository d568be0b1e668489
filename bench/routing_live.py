"""Live runs of the routing benchmark: real HTTP through a router to simulator processes.

The engines run on a slowed clock (``time_scale`` wall seconds per engine second) so
that two cores can relay what eight H100s would stream; send times are stretched by the
same factor and every measured time is divided by it, so results are in engine seconds
and compare directly with the discrete-event runs. The router's own overhead shrinks by
the same factor, which is why it is measured separately at real time
(``rayfleet bench overhead``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bench import loadgen
from bench.fleet_sim import EngineCounters, FleetResult
from bench.routing_workloads import RoutingWorkload
from bench.stats import RequestRecord
from bench.workloads import WORD_VOCAB, RequestSpec
from engines.core.tokenizer import get_tokenizer
from rayfleet.protocol import vllm_metrics as names

_COUNTERS = {
    names.REQUEST_SUCCESS_TOTAL: "requests",
    names.PREFIX_CACHE_QUERIES_TOTAL: "prefix_queries",
    names.PREFIX_CACHE_HITS_TOTAL: "prefix_hits",
    names.NUM_PREEMPTIONS_TOTAL: "preemptions",
}


def parse_counters(text: str) -> EngineCounters:
    """Sum each counter of interest over its label sets (finish reasons, models)."""
    values = dict.fromkeys(_COUNTERS.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        field = _COUNTERS.get(name)
        if field is not None:
            values[field] += float(line.rsplit(" ", 1)[1])
    return EngineCounters(**{key: int(value) for key, value in values.items()})


async def read_counters(session: aiohttp.ClientSession, engine_urls: Sequence[str]) -> list[EngineCounters]:
    async def one(url: str) -> EngineCounters:
        async with session.get(f"{url}/metrics") as response:
            response.raise_for_status()
            return parse_counters(await response.text())

    return list(await asyncio.gather(*(one(url) for url in engine_urls)))


async def reset_prefix_caches(engine_urls: Sequence[str], timeout_s: float = 30.0) -> None:
    """Empty every engine's prefix cache (vLLM refuses while requests hold blocks: retry)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for url in engine_urls:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                async with session.post(f"{url}/reset_prefix_cache") as response:
                    if response.status == 200:
                        break
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"{url} kept refusing /reset_prefix_cache for {timeout_s:.0f}s")
                await asyncio.sleep(0.5)


@dataclass(frozen=True, slots=True)
class LiveRun:
    """One workload through one router: where to send and how the engines' clock runs."""

    target: loadgen.Target
    engine_urls: tuple[str, ...]
    time_scale: float
    salt: int  # first prompt token of this run: no prefix of an earlier run can match
    headers: tuple[tuple[str, str], ...] = ()


def _specs(run: LiveRun, workload: RoutingWorkload) -> list[RequestSpec]:
    tokenizer = get_tokenizer()
    salt = (run.salt % WORD_VOCAB,)
    return [
        RequestSpec(
            send_at=request.send_at * run.time_scale,
            api="completions",
            prompt_len=len(request.token_ids) + 1,
            max_tokens=request.max_tokens,
            prompt=tokenizer.decode(salt + request.token_ids),
            headers=dict(run.headers),
            session=request.session,
            seed=request.seed,
        )
        for request in workload.requests
    ]


def _to_engine_seconds(records: list[RequestRecord], time_scale: float) -> list[RequestRecord]:
    for record in records:
        record.scheduled /= time_scale
        record.sent /= time_scale
        record.end /= time_scale
        record.token_times = [t / time_scale for t in record.token_times]
    return records


async def run_live(run: LiveRun, workload: RoutingWorkload, measure_from_s: float) -> FleetResult:
    """Send ``workload`` open-loop through ``run.target``; engine counters over the measured window.

    Counters are read when the first measured request is due (``measure_from_s``, engine
    seconds) and after the last response, so warm-up traffic is left out of hit rate and
    balance just as it is left out of latency.
    """
    specs = _specs(run, workload)
    prepared = [loadgen.prepare(spec, run.target) for spec in specs]
    send_times = [spec.send_at for spec in specs]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def baseline() -> list[EngineCounters]:
            await asyncio.sleep(measure_from_s * run.time_scale)
            return await read_counters(session, run.engine_urls)

        baseline_task = asyncio.create_task(baseline())
        records = await loadgen.run_open_loop(prepared, send_times, run.target.timeout_s)
        before = await baseline_task
        after = await read_counters(session, run.engine_urls)
    counters = [end.minus(start) for end, start in zip(after, before)]
    return FleetResult(_to_engine_seconds(records, run.time_scale), counters)
