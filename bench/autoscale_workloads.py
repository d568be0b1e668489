"""Workloads for the autoscaling benchmark: the Azure traces scaled to a fleet, and synthetic
rate patterns after AIBrix's autoscaling benchmark.

A workload is a fixed, seeded list of (send time, prompt and output lengths), so every
policy sees the same requests at the same instants. Its offered rate per ``LOAD_BUCKET_S``
bucket is kept alongside: counted from the arrivals for a trace, exact (the rate function's
mean over the bucket) for a synthetic pattern. The burst the reaction time is measured
against is read from it (``Burst.of``).

Traces keep their own time axis (autoscaling is about minutes, so compressing an hour into
a few minutes would change the question); their load is scaled by ``factor`` instead: each
recorded arrival becomes ``factor`` arrivals on average (the integer part always, the
fraction by a seeded coin), the extra ones within the same second and with lengths drawn
from the trace's own rows, so the per-second shape of the trace is kept and its total rate
multiplied.

Synthetic patterns, with ``H`` the peak rate and ``D`` the duration. AIBrix's trend is
``A sin(2 pi k t / D) + B`` (``only_rise``: a running maximum); its fluctuation amplitudes
and periods are kept, but its rising patterns only climb from B to 1.5 B, which the fleet
absorbs without a cold start, so ours climb from a quarter of the peak:

- ``quick_rising``: H/4 until D/5, a quarter-sine ramp to H over D/20 (AIBrix's quarter of
  one of 5 periods), then H;
- ``slow_rising``: from H/4 to H along a quarter sine over the whole run (period 0.25);
- ``slight_fluctuation``: M (1 + 0.1 sin(2 pi t / D)), one period, peaking at H;
- ``severe_fluctuation``: M (1 + 0.5 sin(2 pi 12 t / D)), 12 periods, peaking at H.

Arrivals follow the rate as an inhomogeneous Poisson process (unit-rate Poisson times from
``gamma_arrivals`` mapped through the cumulative rate).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from bench.workloads import LengthPool, TracedRequest, gamma_arrivals, load_azure_trace

LOAD_BUCKET_S = 60.0
_GRID_S = 0.1

Pattern = Literal["quick_rising", "slow_rising", "slight_fluctuation", "severe_fluctuation"]
PATTERNS: tuple[str, ...] = get_args(Pattern)

RateFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class AutoscaleWorkload:
    name: str
    requests: tuple[TracedRequest, ...]  # by send time
    duration_s: float  # the arrival window
    offered_rps: tuple[float, ...]  # per LOAD_BUCKET_S bucket
    mix: str  # where the request lengths come from; workloads of one mix share a concurrency target
    description: str


@dataclass(frozen=True, slots=True)
class Burst:
    """The rise of the offered rate that holds its largest bucket-to-bucket step.

    ``start_s``: where that rise begins (walking back over the buckets that were already
    rising); ``top_s``: the start of the bucket where it peaks (walking forward while it
    still rises). The load of the top bucket is the "post-burst load".
    """

    start_s: float
    top_s: float
    step_rps: float

    @classmethod
    def of(cls, offered_rps: Sequence[float], bucket_s: float = LOAD_BUCKET_S) -> Burst | None:
        steps = [later - earlier for earlier, later in pairwise(offered_rps)]
        if not steps or max(steps) <= 0:
            return None
        largest = max(steps)
        # The first of the largest steps (a periodic pattern repeats it, up to rounding).
        top = start = next(i for i, step in enumerate(steps) if step >= largest * (1 - 1e-9)) + 1
        while start > 1 and offered_rps[start - 1] > offered_rps[start - 2]:
            start -= 1
        while top + 1 < len(offered_rps) and offered_rps[top + 1] > offered_rps[top]:
            top += 1
        return cls(start * bucket_s, top * bucket_s, largest)


def _bucket_count(duration_s: float) -> int:
    return max(1, math.ceil(duration_s / LOAD_BUCKET_S))


def counted_rates(send_times: Sequence[float], duration_s: float) -> tuple[float, ...]:
    counts = np.bincount((np.asarray(send_times) // LOAD_BUCKET_S).astype(int), minlength=_bucket_count(duration_s))
    return tuple((counts[: _bucket_count(duration_s)] / LOAD_BUCKET_S).tolist())


# ---------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------


def scale_trace(traced: Sequence[TracedRequest], factor: float, seed: int = 0) -> list[TracedRequest]:
    """``factor`` times the load with the trace's shape: see the module docstring."""
    if factor <= 0 or not math.isfinite(factor):
        raise ValueError(f"trace scale factor must be a positive number, got {factor}")
    rng = random.Random(seed)
    whole, fraction = int(factor), factor - int(factor)
    scaled: list[TracedRequest] = []
    for request in traced:
        copies = whole + (rng.random() < fraction)
        if copies:
            scaled.append(request)
        for _ in range(copies - 1):
            scaled.append(TracedRequest(request.send_at + rng.random(), rng.choice(traced).lengths))
    scaled.sort(key=lambda r: r.send_at)
    return scaled


def trace_workload(
    name: str, path: str | Path, factor: float, duration_s: float | None = None, seed: int = 0
) -> AutoscaleWorkload:
    """An Azure 2023 trace (``arrived_at,num_prefill_tokens,num_decode_tokens``), its first
    ``duration_s`` seconds (all of it when None), its load scaled by ``factor``."""
    traced = load_azure_trace(path, duration_s=duration_s)
    if not traced:
        raise ValueError(f"{path}: no usable rows")
    requests = scale_trace(traced, factor, seed)
    duration = duration_s or math.ceil(traced[-1].send_at)
    offered = counted_rates([r.send_at for r in requests], duration)
    description = (
        f"{Path(path).name}, {'first ' + format(duration, 'g') + ' s' if duration_s else 'whole trace'}, "
        f"load x{factor:g}: {len(requests)} requests, {len(requests) / duration:.1f} req/s mean, "
        f"{max(offered):.1f} req/s in the busiest minute"
    )
    return AutoscaleWorkload(name, tuple(requests), float(duration), offered, Path(path).name, description)


# ---------------------------------------------------------------------------------------
# Synthetic patterns
# ---------------------------------------------------------------------------------------


def pattern_rate(pattern: Pattern, peak_rps: float, duration_s: float) -> RateFunction:
    """The pattern's offered rate (req/s) as a function of time (s)."""
    low = peak_rps / 4
    if pattern == "quick_rising":
        rise_at, ramp = duration_s / 5, duration_s / 20
        return lambda t: low + (peak_rps - low) * np.sin(np.pi / 2 * np.clip((t - rise_at) / ramp, 0.0, 1.0))
    if pattern == "slow_rising":
        return lambda t: low + (peak_rps - low) * np.sin(np.pi / 2 * np.clip(t / duration_s, 0.0, 1.0))
    amplitude, periods = (0.1, 1) if pattern == "slight_fluctuation" else (0.5, 12)
    mean = peak_rps / (1 + amplitude)
    return lambda t: mean * (1 + amplitude * np.sin(2 * np.pi * periods * t / duration_s))


def synthetic_workload(
    pattern: Pattern, peak_rps: float, duration_s: float, lengths: LengthPool, mix: str, seed: int = 0
) -> AutoscaleWorkload:
    workload = rate_workload(pattern, pattern_rate(pattern, peak_rps, duration_s), duration_s, lengths, mix, seed)
    description = f"{pattern}: peak {peak_rps:g} req/s over {duration_s:g} s, {len(workload.requests)} requests"
    return replace(workload, description=description)


def constant_workload(
    rate_rps: float, duration_s: float, lengths: LengthPool, mix: str, seed: int = 0
) -> AutoscaleWorkload:
    return rate_workload("constant", lambda t: np.full_like(t, rate_rps), duration_s, lengths, mix, seed)


def rate_workload(
    name: str, rate: RateFunction, duration_s: float, lengths: LengthPool, mix: str, seed: int = 0
) -> AutoscaleWorkload:
    """Poisson arrivals whose rate follows ``rate`` over ``duration_s``, lengths by index from ``lengths``."""
    if duration_s < LOAD_BUCKET_S:
        raise ValueError(f"a rate workload lasts at least {LOAD_BUCKET_S:g} s, got {duration_s:g}")
    # The cumulative rate on a grid of _GRID_S steps (midpoint rule): exact enough to invert
    # for arrivals and to average per bucket.
    steps_per_bucket = round(LOAD_BUCKET_S / _GRID_S)
    grid = np.arange(round(duration_s / _GRID_S) + 1) * _GRID_S
    cumulative = np.concatenate(([0.0], np.cumsum(rate(grid[:-1] + _GRID_S / 2) * _GRID_S)))
    count = round(cumulative[-1])
    if count < 1:
        raise ValueError(f"{name}: the rate offers no request in {duration_s:g} s")
    unit_times = np.asarray(gamma_arrivals(1.0, count, 1.0, seed)) * (cumulative[-1] / count)
    times = np.interp(unit_times, cumulative, grid).tolist()
    requests = tuple(TracedRequest(t, lengths(i)) for i, t in enumerate(times))
    edges = np.minimum(np.arange(_bucket_count(duration_s) + 1) * steps_per_bucket, len(grid) - 1)
    offered = tuple(float((cumulative[b] - cumulative[a]) / LOAD_BUCKET_S) for a, b in pairwise(edges))
    description = f"{name}: {len(requests)} requests over {duration_s:g} s (Poisson)"
    return AutoscaleWorkload(name, requests, float(duration_s), offered, mix, description)
