"""A work queue of object keys, as client-go's: each key is queued at most once, a key being
worked on is never handed to a second worker, and failures come back with backoff.

Watches only say "look at this fleet again"; the reconcile reads the truth itself. So many
events for one fleet collapse into one reconcile, which is what level-triggered means.
"""

from __future__ import annotations

import heapq
import threading
import time


class WorkQueue:
    def __init__(self, base_backoff_s: float = 0.05, max_backoff_s: float = 30.0) -> None:
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()  # added while processing: queued again when done
        self._delayed: list[tuple[float, str]] = []  # (when, key) heap
        self._failures: dict[str, int] = {}
        self._base, self._max = base_backoff_s, max_backoff_s
        self._closed = False

    def add(self, key: str) -> None:
        with self._cond:
            self._enqueue(key)

    def _enqueue(self, key: str) -> None:
        """Queue ``key`` once; one being worked on comes back when its worker is done.
        Called with the lock held."""
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: str, delay_s: float) -> None:
        """Queue ``key`` once ``delay_s`` has passed (minReadySeconds, progress deadlines)."""
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay_s, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> None:
        """After a failure: exponential backoff per key, reset by ``forget``."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self.add_after(key, min(self._base * 2**failures, self._max))

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def get(self, timeout_s: float | None = None) -> str | None:
        """The next key to work on (mark it ``done`` after), or None when closed or timed out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._promote_due()
                if self._queue:
                    key = self._queue.pop(0)
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if self._closed:
                    return None
                now = time.monotonic()
                waits = [w for w in (self._delayed[0][0] - now if self._delayed else None,
                                     None if deadline is None else deadline - now) if w is not None]  # fmt: skip
                if deadline is not None and now >= deadline:
                    return None
                self._cond.wait(max(min(waits), 0.0) if waits else None)

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._enqueue(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _promote_due(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, key = heapq.heappop(self._delayed)
            self._enqueue(key)
