"""What to send and when: request specs, arrival processes, length sources, prompts.

Everything is a pure function of its inputs and a seed, so a run can be repeated exactly
(and re-run against another URL with ``--direct``). Data files are read from paths given
by the caller; nothing here knows where the example traces live.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

Api = Literal["chat", "completions"]

# The tokenizer contract guarantees encode(decode(ids)) == ids for word ids below this.
WORD_VOCAB = 128_000
# A request's unique prefix: [salt, index // WORD_VOCAB, index % WORD_VOCAB].
UNIQUE_PREFIX_TOKENS = 3


class Tokenizer(Protocol):
    """The part of ``engines.core.tokenizer`` prompts need: word ids to text."""

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(slots=True)
class RequestSpec:
    """One request to send: when (seconds after the run starts), where, and what."""

    send_at: float
    api: Api
    prompt_len: int  # intended prompt tokens (a chat template adds a few on the server)
    max_tokens: int
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat
    ignore_eos: bool = True  # so the output length is exactly max_tokens, as the workload says
    headers: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    session: str | None = None
    seed: int | None = None  # sampling seed: the simulator's answer is then a function of it


@dataclass(frozen=True, slots=True)
class Lengths:
    prompt: int
    output: int


@dataclass(frozen=True, slots=True)
class LengthPool:
    """Lengths by request index, cycling when a run outlasts the pool."""

    pairs: tuple[Lengths, ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("a length pool needs at least one (prompt, output) pair")

    def __call__(self, index: int) -> Lengths:
        return self.pairs[index % len(self.pairs)]

    @classmethod
    def fixed(cls, prompt_len: int, output_len: int) -> LengthPool:
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"lengths must be >= 1, got input {prompt_len}, output {output_len}")
        return cls((Lengths(prompt_len, output_len),))

    @classmethod
    def shuffled(cls, pairs: Sequence[Lengths], seed: int) -> LengthPool:
        """A seeded permutation, so a sample of N is N distinct dataset rows."""
        order = list(pairs)
        random.Random(seed).shuffle(order)
        return cls(tuple(order))


@dataclass(frozen=True, slots=True)
class TracedRequest:
    send_at: float
    lengths: Lengths


def gamma_arrivals(rate: float, count: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s) of ``count`` requests at mean ``rate``/s, as ``vllm bench serve`` draws them.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): burstiness 1 is Poisson,
    below 1 burstier, above 1 more regular. The gaps are then rescaled so the last send is
    at exactly ``count/rate``: without it a seed's sum drifts a few percent and
    throughput results wobble with the seed.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive finite number, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if count < 1:
        return []
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    times = np.cumsum(gaps)
    times *= (count / rate) / times[-1]
    return times.tolist()


def count_for_duration(rate: float, duration_s: float) -> int:
    """How many requests a ``duration_s`` run at ``rate`` offers (at least one)."""
    return max(1, round(rate * duration_s))


def offered_rate(send_times: Sequence[float]) -> float | None:
    """Requests per second of a schedule, by the same convention as ``gamma_arrivals``."""
    last = max(send_times, default=0.0)
    return len(send_times) / last if last > 0 else None


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in required if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)}: expected {','.join(required)}")
        return list(reader)


def _lengths(row: dict[str, str]) -> Lengths:
    return Lengths(int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"])))


def load_length_pairs(path: str | Path) -> list[Lengths]:
    """ShareGPT-style ``num_prefill_tokens,num_decode_tokens,...`` rows; empty sides dropped."""
    rows = _read_csv(Path(path), ("num_prefill_tokens", "num_decode_tokens"))
    pairs = [_lengths(row) for row in rows]
    return [pair for pair in pairs if pair.prompt >= 1 and pair.output >= 1]


def load_azure_trace(
    path: str | Path,
    time_scale: float = 1.0,
    start_s: float = 0.0,
    max_requests: int | None = None,
    duration_s: float | None = None,
) -> list[TracedRequest]:
    """The Azure LLM inference 2023 CSV (``arrived_at,num_prefill_tokens,num_decode_tokens``).

    Arrival times are kept as recorded, shifted so ``start_s`` (trace seconds) is time 0,
    then multiplied by ``time_scale`` (0.1 replays ten times faster). ``duration_s`` is in
    replayed seconds, i.e. after scaling, like the run's own duration.
    """
    if time_scale <= 0:
        raise ValueError(f"trace time scale must be > 0, got {time_scale}")
    rows = _read_csv(Path(path), ("arrived_at", "num_prefill_tokens", "num_decode_tokens"))
    requests: list[TracedRequest] = []
    for row in rows:
        arrived = float(row["arrived_at"])
        if arrived < start_s:
            continue
        send_at = (arrived - start_s) * time_scale
        if duration_s is not None and send_at >= duration_s:
            continue
        lengths = _lengths(row)
        if lengths.prompt < 1 or lengths.output < 1:
            continue
        requests.append(TracedRequest(send_at, lengths))
        if max_requests is not None and len(requests) >= max_requests:
            break
    return requests


@dataclass(frozen=True, slots=True)
class PromptBuilder:
    """Prompts of exact token counts from seeded random word ids.

    Each request starts with ``[salt, index // V, index % V]``: no two requests of one run
    share even their first block, so prefix caching never flatters a benchmark by accident.
    The rest is random ids seeded by (seed, index), so a different ``salt`` gives a second
    run the very same prompts but one first token, hence none of the first run's cached
    prefixes.
    """

    tokenizer: Tokenizer
    seed: int = 0
    salt: int = 0

    def token_ids(self, index: int, length: int) -> list[int]:
        prefix = [self.salt % WORD_VOCAB, (index // WORD_VOCAB) % WORD_VOCAB, index % WORD_VOCAB]
        body_len = max(length - UNIQUE_PREFIX_TOKENS, 0)
        body = np.random.default_rng((self.seed, index)).integers(0, WORD_VOCAB, size=body_len)
        return (prefix + body.tolist())[:length]

    def text(self, index: int, length: int) -> str:
        return self.tokenizer.decode(self.token_ids(index, length))


@dataclass(frozen=True, slots=True)
class Workload:
    """Lengths and prompts by request index; the arrival process is the caller's business."""

    name: str
    api: Api
    lengths: LengthPool
    prompts: PromptBuilder
    headers: dict[str, str] = field(default_factory=dict)

    def spec(self, index: int, send_at: float = 0.0) -> RequestSpec:
        lengths = self.lengths(index)
        text = self.prompts.text(index, lengths.prompt)
        chat = self.api == "chat"
        return RequestSpec(
            send_at=send_at,
            api=self.api,
            prompt_len=lengths.prompt,
            max_tokens=lengths.output,
            prompt=None if chat else text,
            messages=[{"role": "user", "content": text}] if chat else None,
            headers=dict(self.headers),
        )

    def specs(self, send_times: Sequence[float]) -> list[RequestSpec]:
        return [self.spec(index, send_at) for index, send_at in enumerate(send_times)]

    def salted(self, salt: int) -> Workload:
        return replace(self, prompts=replace(self.prompts, salt=salt))
