"""The one way tests wait for something to become true: poll it, with a named deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], what: str, timeout_s: float, interval_s: float = 0.1) -> None:
    """Poll ``check`` until it holds, or raise ``TimeoutError`` naming ``what``; ``check`` may raise to
    give up early. Deadlines are generous on purpose: this is a noisy 2-core machine, and a
    deadline only bounds how long a broken run takes to fail."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
