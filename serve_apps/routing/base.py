"""The routing seam: a strategy picks one endpoint for one request from plain state.

Strategies are pure: they read a ``RoutingRequest`` and the candidates' ``EndpointState``
and return one of the candidates. They never do I/O, so the same code runs in the live
gateway and in the discrete-event benchmarks, and a test can drive one with hand-made state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

from serve_apps.routing.signals import EngineMetrics, GatewayStats


@dataclass(slots=True)
class EndpointState:
    """The gateway's live view of one endpoint, as strategies see it.

    ``in_flight`` counts this gateway replica's requests that the endpoint has not
    finished answering; the gateway keeps it exact (incremented when it routes, decremented
    when the response ends, errors included). ``engine_metrics`` is the latest scrape of the
    engine's ``/metrics`` (None until the first one succeeds; readers check its age with
    ``signals.fresh``); ``stats`` is what this gateway measured on its own requests.
    """

    name: str
    url: str
    ready: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0
    engine_metrics: EngineMetrics | None = None
    stats: GatewayStats = field(default_factory=GatewayStats)
    # Requests this replica sent since ``engine_metrics`` was scraped: the scrape cannot
    # show them yet, so metric-driven strategies add them to it (see least-kv-cache).
    dispatched_since_scrape: int = 0
    # Prompt tokens this replica sent here that the engine has not started answering yet,
    # as the routing strategy estimated them (uncached ones, for prefix strategies): the
    # prefill work queued ahead of a new request, which is what its TTFT waits for.
    prefill_backlog: int = 0

    def on_dispatch(self, now: float, prefill_tokens: int = 0) -> None:
        """A request was sent here."""
        self.in_flight += 1
        self.dispatched_since_scrape += 1
        self.prefill_backlog += prefill_tokens
        self.stats.record_start(now)

    def on_first_token(self, prefill_tokens: int) -> None:
        """The engine answered a request's prompt (or gave up on it): its prefill is done."""
        self.prefill_backlog -= prefill_tokens

    def on_finish(
        self, now: float, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float
    ) -> None:
        """A request sent here ended (failures too: pass zero tokens and no TTFT)."""
        self.in_flight -= 1
        self.stats.record_finish(now, prompt_tokens, output_tokens, ttft_s, e2e_s)

    def on_scrape(self, metrics: EngineMetrics) -> None:
        """A fresh scrape now accounts for everything dispatched before it."""
        self.engine_metrics = metrics
        self.dispatched_since_scrape = 0


# ``RoutingRequest.derived`` key where a strategy leaves its estimate of the prompt tokens
# the chosen endpoint must compute (``EndpointState.prefill_backlog`` adds it up).
PREFILL_ESTIMATE_KEY = "prefill_estimate"


@dataclass(slots=True)
class RoutingRequest:
    """What a strategy may know about a request: its model, headers and parsed body.

    The prompt text is extracted only when a strategy asks for it, so strategies that
    do not need it (random, least-request) cost nothing extra.
    """

    model: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    # The LoRA adapter the request names (its ``model`` when that is not the endpoints' base
    # model): vLLM hashes the adapter's name into every KV block of such a request.
    lora_name: str | None = None
    # Values derived from the request by strategies or indexes (token ids, block hashes),
    # kept so that a request is tokenised and hashed at most once however many use them.
    derived: dict[str, Any] = field(default_factory=dict)
    _prompt_text: str | None = None

    @property
    def prompt_text(self) -> str:
        if self._prompt_text is None:
            self._prompt_text = extract_prompt_text(self.body)
        return self._prompt_text


def extract_prompt_text(body: dict[str, Any]) -> str:
    """The text a request asks the model to continue, without any chat template.

    Chat: every message's text content in order (string content, or the text parts of a
    content list). Completions: the prompt string (or strings joined). Token-id prompts
    have no text and give "".
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        pieces: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                pieces.append(content)
            elif isinstance(content, list):
                pieces.extend(
                    part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
        return "\n".join(pieces)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return ""


class RoutingStrategy(Protocol):
    """One routing policy. ``candidates`` is never empty and holds only ready endpoints."""

    name: ClassVar[str]

    def choose(self, request: RoutingRequest, candidates: Sequence[EndpointState]) -> EndpointState: ...


@runtime_checkable
class RequestHooks(Protocol):
    """Optional: a strategy that learns from what it routed (vtc-basic's served tokens).

    The gateway calls ``on_request_start`` once per request the strategy routes, and
    ``on_request_finish`` once when it ends, with the tokens served (zeros on failure).
    """

    def on_request_start(self, request: RoutingRequest) -> None: ...

    def on_request_finish(self, request: RoutingRequest, prompt_tokens: int, output_tokens: int) -> None: ...


def pick_uniform_minimum(
    candidates: Sequence[EndpointState], key: Any, rng: random.Random
) -> EndpointState:
    """The candidate with the smallest ``key``, ties broken uniformly at random.

    A fixed tie-break (first or last) would send every request to the same endpoint
    whenever the load is level, e.g. at low traffic; random ties spread it.
    """
    best_value = None
    best: list[EndpointState] = []
    for candidate in candidates:
        value = key(candidate)
        if best_value is None or value < best_value:
            best_value, best = value, [candidate]
        elif value == best_value:
            best.append(candidate)
    return best[0] if len(best) == 1 else rng.choice(best)
