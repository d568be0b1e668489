"""Token counts of a finished response, read from the engine's own ``usage``.

The gateway needs them for its load signals (throughput, latency per token) and for
fairness (vtc-basic). Non-streamed bodies carry ``usage``; a stream carries it in its last
event only when the client asked for ``stream_options.include_usage``, so for other streams
the count of content events stands in (vLLM sends one event per generated token).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

_USAGE = b'"usage"'
_DATA = b"data: {"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def usage_from_json(payload: bytes) -> Usage:
    """Usage of a non-streamed OpenAI response; zeros if it has none (e.g. an error body)."""
    try:
        usage = orjson.loads(payload).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return Usage()
    if not isinstance(usage, dict):
        return Usage()
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class StreamUsage:
    """Follows an SSE stream chunk by chunk, cheaply: it only counts and remembers."""

    __slots__ = ("events", "_last_usage_chunk")

    def __init__(self) -> None:
        self.events = 0
        self._last_usage_chunk: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(_DATA)
        if _USAGE in chunk:
            self._last_usage_chunk = chunk

    def result(self) -> Usage:
        if self._last_usage_chunk is not None:
            for line in reversed(self._last_usage_chunk.split(b"\n")):
                if line.startswith(_DATA[:6]) and _USAGE in line:
                    usage = usage_from_json(line[6:])
                    if usage.output_tokens or usage.prompt_tokens:
                        return usage
        # No usage event: one event per token, minus the role-only first event of chat.
        return Usage(0, max(self.events - 1, 0))
