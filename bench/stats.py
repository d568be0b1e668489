"""Per-request records in, ``vllm bench serve`` metrics out.

The definitions follow vLLM's ``vllm/benchmarks/serve.py`` so our numbers can be set
next to theirs: TTFT is the first streamed token chunk, TPOT is
``(E2E - TTFT) / (output_tokens - 1)`` for requests with more than one output token, ITL
is every gap between token chunks pooled over all requests, percentiles are numpy's
linear interpolation, and goodput counts requests meeting *all* given SLOs (DistServe).
Everything here is pure: the load generator measures, this module only counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict

MS_PER_S = 1000.0


@dataclass(slots=True)
class RequestRecord:
    """What the client observed for one request, on one clock (seconds since run start).

    ``end`` is the last token chunk for a streamed request (vLLM's E2E ignores the usage
    chunk and ``[DONE]`` that follow it) and the full body for a non-streamed one.
    ``status`` is the HTTP status, 0 when no response arrived (connection error, timeout).
    """

    index: int
    scheduled: float
    sent: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    status: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def ttft(self) -> float | None:
        """``None`` when nothing was streamed: a non-streamed request has no first token."""
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        times = self.token_times
        return [later - earlier for earlier, later in zip(times, times[1:])]


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency objectives in seconds; ``None`` means "not an objective"."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @property
    def any(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None or self.e2e_s is not None

    def met_by(self, record: RequestRecord) -> bool:
        """vLLM counts TPOT as 0 for single-token outputs; an unmeasured TTFT cannot meet an SLO."""
        ttft = record.ttft
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            return False
        if self.tpot_s is not None and (ttft is None or (record.tpot or 0.0) > self.tpot_s):
            return False
        return self.e2e_s is None or record.e2e <= self.e2e_s


@dataclass(frozen=True, slots=True)
class Warmup:
    """The head of a run that statistics ignore: the first ``requests`` sent, or those
    scheduled in the first ``seconds`` (a cold cache or a ramping autoscaler is not the
    steady state we want to report)."""

    requests: int = 0
    seconds: float = 0.0

    def split(self, records: list[RequestRecord]) -> tuple[float, list[RequestRecord]]:
        """Where the measured window opens, and the requests inside it.

        The window opens at the warm-up deadline, or when the last warm-up request was
        scheduled: N measured requests then span N inter-arrival gaps, as a run without
        warm-up spans N gaps from time 0, so achieved matches offered at light load.
        """
        by_send = sorted(records, key=lambda r: (r.scheduled, r.index))
        warm, rest = by_send[: self.requests], by_send[self.requests :]
        start = max(self.seconds, warm[-1].scheduled if warm else 0.0)
        return start, [r for r in rest if r.scheduled >= self.seconds]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency metric, in seconds; all ``None`` when nothing was measured."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> Distribution:
        if not values:
            return cls()
        array = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = np.percentile(array, [50, 90, 99])
        return cls(len(values), float(array.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True, slots=True)
class Metrics:
    """The ``vllm bench serve`` result block for one run's measured window."""

    completed: int
    errors: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    good: int | None
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution

    def per_s(self, count: int | None) -> float | None:
        if count is None:
            return None
        return count / self.duration_s if self.duration_s > 0 else 0.0


def compute_metrics(records: list[RequestRecord], slo: Slo = Slo(), warmup: Warmup = Warmup()) -> Metrics:
    """Rates divide by the measured window, from its start to the last measured request's end."""
    start, measured = warmup.split(records)
    done = [r for r in measured if r.ok]
    end = max((r.end for r in measured), default=start)
    ttfts = [t for r in done if (t := r.ttft) is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    itls = [gap for r in done for gap in r.itls()]
    return Metrics(
        completed=len(done),
        errors=len(measured) - len(done),
        duration_s=max(end - start, 0.0),
        input_tokens=sum(r.prompt_tokens or 0 for r in done),
        output_tokens=sum(r.output_tokens for r in done),
        good=sum(1 for r in done if slo.met_by(r)) if slo.any else None,
        ttft=Distribution.of(ttfts),
        tpot=Distribution.of(tpots),
        itl=Distribution.of(itls),
        e2e=Distribution.of([r.e2e for r in done]),
    )


def max_send_lag(records: list[RequestRecord]) -> float:
    """How far behind its schedule the load generator sent (0 when it kept time)."""
    return max((r.sent - r.scheduled for r in records), default=0.0)


def error_samples(records: list[RequestRecord], limit: int = 5) -> list[str]:
    """Distinct error messages, first seen first: enough to tell a 503 storm from a typo'd URL."""
    seen: dict[str, None] = {}
    for record in records:
        if record.error is not None:
            seen.setdefault(f"HTTP {record.status}: {record.error}" if record.status else record.error, None)
            if len(seen) >= limit:
                break
    return list(seen)


class BenchRow(BaseModel):
    """One line of a benchmark result, in seconds and per-second rates.

    Other benchmarks add their own columns (hit_rate, imbalance, mode, ...) as extras.
    """

    model_config = ConfigDict(extra="allow")

    policy: str
    workload: str
    offered_rps: float | None = None
    achieved_rps: float
    goodput_rps: float | None = None
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p99_s: float | None = None
    ttft_mean_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p99_s: float | None = None
    itl_p99_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p99_s: float | None = None
    e2e_mean_s: float | None = None
    output_tok_s: float
    completed: int
    errors: int
    concurrency: int | None = None
    duration_s: float | None = None

    @classmethod
    def from_metrics(
        cls,
        metrics: Metrics,
        policy: str,
        workload: str,
        offered_rps: float | None = None,
        concurrency: int | None = None,
        **extra: Any,
    ) -> BenchRow:
        return cls(
            policy=policy,
            workload=workload,
            offered_rps=offered_rps,
            achieved_rps=metrics.per_s(metrics.completed) or 0.0,
            goodput_rps=metrics.per_s(metrics.good),
            ttft_p50_s=metrics.ttft.p50,
            ttft_p90_s=metrics.ttft.p90,
            ttft_p99_s=metrics.ttft.p99,
            ttft_mean_s=metrics.ttft.mean,
            tpot_p50_s=metrics.tpot.p50,
            tpot_p99_s=metrics.tpot.p99,
            itl_p99_s=metrics.itl.p99,
            e2e_p50_s=metrics.e2e.p50,
            e2e_p99_s=metrics.e2e.p99,
            e2e_mean_s=metrics.e2e.mean,
            output_tok_s=metrics.per_s(metrics.output_tokens) or 0.0,
            completed=metrics.completed,
            errors=metrics.errors,
            concurrency=concurrency,
            duration_s=metrics.duration_s,
            **extra,
        )


class BenchReport(BaseModel):
    """What ``--out FILE`` holds: the benchmark's name, its rows, and how it was run."""

    bench: str
    rows: list[BenchRow]
    notes: list[str] = []
    meta: dict[str, Any] = {}

    def write(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
