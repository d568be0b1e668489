"""Time-bucketed sliding windows, as Knative's autoscaler keeps them.

Two shapes, both taking the time as an argument (no clock is read here, so the same code runs
live and in the discrete-event simulation):

- ``TimedBuckets`` (Knative's ``aggregation.TimedFloat64Buckets``): values land in buckets of
  ``granularity`` seconds and ``window_average`` is the mean bucket value over the window, the
  "average over the window of per-second values" that KPA's stable and panic values and APA's
  window are.
- ``MaxWindow`` (Knative's ``aggregation/max.TimeWindow``): the largest value recorded over the
  last ``duration``, which is how the scale-down delay holds a recent higher pod count.

One deliberate difference: a Knative bucket sums what is recorded into it, because its scraper
records exactly one aggregated stat per one-second bucket. Our scrape interval is configurable,
so a bucket here keeps the mean of its samples; with one sample per bucket the two agree.
"""

from __future__ import annotations

import math
from collections import deque

BUCKET_SIZE = 1.0  # Knative's metric bucket (and scrape tick): one second
_PRECISION = 1e6  # Knative floors averages to 6 decimals so float noise cannot push a ceil() up


def _floor_to_precision(value: float) -> float:
    return math.floor(value * _PRECISION) / _PRECISION


class TimedBuckets:
    """Knative's window average over time buckets.

    The average runs from the first write (or the window's start, whichever is later) to the
    last write: a gap between writes counts as zero, trailing buckets after the last write do
    not count at all (the next scrape is late, not zero), and after a whole window without a
    write the window is empty and starts afresh.
    """

    def __init__(self, window: float, granularity: float = BUCKET_SIZE) -> None:
        if window <= 0 or granularity <= 0:
            raise ValueError("window and granularity must be positive")
        self.window = window
        self.granularity = granularity
        self._size = math.ceil(window / granularity)  # buckets in a window
        self._buckets: dict[int, tuple[float, int]] = {}  # bucket index -> (sum, count)
        self._first: int | None = None
        self._last: int | None = None

    def _index(self, now: float) -> int:
        return math.floor(now / self.granularity)

    def _silent_for(self, index: int) -> float:
        """Seconds from the last write's bucket to ``index``'s bucket."""
        assert self._last is not None
        return (index - self._last) * self.granularity

    def record(self, now: float, value: float) -> None:
        index = self._index(now)
        if self._last is None or self._silent_for(index) > self.window:
            self._buckets.clear()
            self._first = self._last = index
        elif index <= self._last - self._size:
            return  # older than the window: it can no longer count
        self._last = max(self._last, index)
        total, count = self._buckets.get(index, (0.0, 0))
        self._buckets[index] = (total + value, count + 1)
        for stale in [i for i in self._buckets if i <= self._last - self._size]:
            del self._buckets[stale]

    def is_empty(self, now: float) -> bool:
        """No write within the last window: Knative's ``ErrNoData``."""
        return self._last is None or self._silent_for(self._index(now)) > self.window

    def window_average(self, now: float) -> float:
        if self.is_empty(now):
            return 0.0
        assert self._first is not None and self._last is not None
        end = self._last
        start = max(self._first, max(self._index(now), end) - self._size + 1)
        if start > end:
            return 0.0
        total = sum(s / c for i, (s, c) in self._buckets.items() if start <= i <= end)
        return _floor_to_precision(total / (end - start + 1))


class MaxWindow:
    """Knative's max over a time window (a monotonic "ascending minima" queue).

    ``current()`` is the largest value recorded in the ``ceil(duration / granularity)`` buckets
    up to the latest ``record``; Knative records on every decision, so that is "now".
    """

    def __init__(self, duration: float, granularity: float) -> None:
        if duration <= 0 or granularity <= 0:
            raise ValueError("duration and granularity must be positive")
        self.granularity = granularity
        self._size = math.ceil(duration / granularity)
        self._maxima: deque[tuple[int, float]] = deque()  # (bucket index, value), values descending

    def record(self, now: float, value: float) -> None:
        index = math.floor(now / self.granularity)
        # A smaller, older value can never be the maximum again.
        while self._maxima and value >= self._maxima[-1][1]:
            self._maxima.pop()
        while self._maxima and index - self._maxima[0][0] >= self._size:
            self._maxima.popleft()
        if self._maxima and self._maxima[-1][0] == index:
            return  # a larger value already holds this bucket
        self._maxima.append((index, value))

    def current(self) -> float:
        return self._maxima[0][1] if self._maxima else 0.0
