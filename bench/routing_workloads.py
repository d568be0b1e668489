"""Workloads for the routing benchmark: prompts as token ids, with the sharing structure
that makes routing matter.

A routing policy can only win by sending a prompt where its prefix is cached, so these
workloads are built from token ids whose sharing is exact and known: the same system
prompt is the very same ids in every request of a group, a multi-turn session re-sends
its history including the answers the engine gave, and a Mooncake row is rebuilt block
by block from its ``hash_ids``. Text for the live runs is ``tokenizer.decode(ids)``;
the simulator encodes it back to the same ids (its tokenizer guarantees the round trip),
behind the BOS token the completions API adds, which the discrete-event run adds too.

Every workload is a fixed list of requests with send times at a *base* rate; a run at
another rate scales the times (``at_rate``), so every policy and every rate sees the same
requests in the same order (common random numbers) and only the spacing changes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from bench.workloads import WORD_VOCAB, gamma_arrivals, load_azure_trace
from engines.core.output_length import next_token, plan_output
from engines.core.types import SamplingSpec

GroupDistribution = Literal["uniform", "zipf"]
MOONCAKE_BLOCK_TOKENS = 512  # the Mooncake traces hash prompts in 512-token blocks


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """One request: when (seconds from the start, engine time), its prompt ids and output.

    ``seed`` goes into the request's sampling parameters: the engine's answer is then a
    pure function of it, which is what lets a multi-turn session re-send the history it
    received without the client having to wait for it (see ``engine_answer``).
    """

    index: int
    send_at: float
    token_ids: tuple[int, ...]
    max_tokens: int
    seed: int
    session: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingWorkload:
    name: str
    requests: tuple[RoutedRequest, ...]
    base_rate: float  # requests/s of ``requests`` as built
    description: str

    def at_rate(self, rate: float) -> RoutingWorkload:
        """The same requests, their send times stretched or squeezed to ``rate`` requests/s."""
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive finite number, got {rate}")
        factor = self.base_rate / rate
        requests = tuple(replace(r, send_at=r.send_at * factor) for r in self.requests)
        return replace(self, requests=requests, base_rate=rate)

    def head(self, count: int) -> RoutingWorkload:
        """The first ``count`` requests by send time (a shorter run of the same workload)."""
        requests = tuple(sorted(self.requests, key=lambda r: (r.send_at, r.index))[:count])
        return replace(self, requests=requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)


def _random_ids(rng_key: Sequence[int], length: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng(list(rng_key)).integers(0, WORD_VOCAB, size=length).tolist())


def engine_answer(seed: int, max_tokens: int) -> tuple[int, ...]:
    """The token ids the simulated engine generates for a request with this ``seed``
    and ``ignore_eos`` (the simulator's output stream is a pure function of the seed)."""
    state = plan_output(SamplingSpec(max_tokens=max_tokens, ignore_eos=True, seed=seed), seed).token_state
    ids: list[int] = []
    for _ in range(max_tokens):
        state, token_id = next_token(state)
        ids.append(token_id)
    return tuple(ids)


def _poisson_times(count: int, seed: int) -> list[float]:
    """``count`` Poisson arrivals at 1 request/s (``at_rate`` rescales them)."""
    return gamma_arrivals(1.0, count, 1.0, seed)


def _zipf_weights(count: int, alpha: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1, dtype=float) ** alpha
    return weights / weights.sum()


def shared_prefix(
    num_groups: int = 512,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    distribution: GroupDistribution = "uniform",
    zipf_alpha: float = 1.1,
    seed: int = 0,
) -> RoutingWorkload:
    """SGLang's ``generated-shared-prefix`` dataset as an open-loop workload.

    ``uniform``: every group sends exactly ``prompts_per_group`` distinct questions, in a
    shuffled order (SGLang's shape). ``zipf``: the same number of requests, each from a
    group drawn with probability proportional to 1/rank^alpha, so a few system prompts are
    hot and a long tail is cold. Arrivals are Poisson.
    """
    for value, what in ((num_groups, "groups"), (prompts_per_group, "prompts per group"), (output_len, "output len")):
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    rng = np.random.default_rng([seed, 1])
    total = num_groups * prompts_per_group
    if distribution == "uniform":
        groups = np.repeat(np.arange(num_groups), prompts_per_group)
        rng.shuffle(groups)
    else:
        groups = rng.choice(num_groups, size=total, p=_zipf_weights(num_groups, zipf_alpha))
    system_prompts = [_random_ids((seed, 2, g), system_prompt_len) for g in range(num_groups)]
    asked = [0] * num_groups
    times = _poisson_times(total, seed)
    requests = []
    for index, (group, send_at) in enumerate(zip(groups.tolist(), times)):
        question = _random_ids((seed, 3, group, asked[group]), question_len)
        asked[group] += 1
        requests.append(RoutedRequest(index, send_at, system_prompts[group] + question, output_len, seed * 1_000_003 + index))
    name = f"gsp-{distribution}"
    description = (
        f"{num_groups} groups x {prompts_per_group} prompts ({distribution}"
        + (f", alpha {zipf_alpha}" if distribution == "zipf" else "")
        + f"), system prompt {system_prompt_len}, question {question_len}, output {output_len} tokens"
    )
    return RoutingWorkload(name, tuple(requests), 1.0, description)


def multi_turn(
    num_sessions: int = 256,
    turns: int = 6,
    system_prompt_len: int = 1024,
    question_len: int = 96,
    answer_len: int = 128,
    turn_gap_s: float = 20.0,
    seed: int = 0,
) -> RoutingWorkload:
    """Chat sessions that re-send their whole history every turn.

    Turn k's prompt is the session's system prompt, then each earlier question followed by
    the answer the engine gave it, then the new question: a session's prefix grows by a
    question and an answer per turn, and only the engine that served the last turn holds
    it. Sessions start as a Poisson process; turns follow ``turn_gap_s`` apart (at the
    base rate; ``at_rate`` scales the gaps with everything else), independent of when the
    previous answer finished, so every policy sees the same arrivals.
    """
    starts = gamma_arrivals(1.0, num_sessions, 1.0, seed)
    requests: list[RoutedRequest] = []
    for session in range(num_sessions):
        history = _random_ids((seed, 4, session), system_prompt_len)
        for turn in range(turns):
            history += _random_ids((seed, 5, session, turn), question_len)
            request_seed = seed * 1_000_003 + session * turns + turn
            send_at = starts[session] + turn * turn_gap_s
            requests.append(RoutedRequest(0, send_at, history, answer_len, request_seed, f"s{session}"))
            history += engine_answer(request_seed, answer_len)
    ordered = sorted(requests, key=lambda r: r.send_at)
    base_rate = len(ordered) / ordered[-1].send_at
    description = (
        f"{num_sessions} sessions x {turns} turns, system prompt {system_prompt_len}, "
        f"question {question_len}, answer {answer_len} tokens, history re-sent"
    )
    return RoutingWorkload(
        "multi-turn", tuple(replace(r, index=i) for i, r in enumerate(ordered)), base_rate, description
    )


def _trace_rate(times: Sequence[float]) -> float:
    span = max(times) - min(times)
    return len(times) / span if span > 0 else 1.0


def azure_conversation(path: str | Path, max_requests: int = 4000, seed: int = 0) -> RoutingWorkload:
    """The Azure LLM inference 2023 conversation trace: recorded times and lengths.

    The trace has no text, so prompts are unique random ids: this workload shows what a
    policy does with load alone, when there is no prefix to exploit.
    """
    traced = load_azure_trace(path, max_requests=max_requests)
    if not traced:
        raise ValueError(f"{path}: no usable rows")
    requests = tuple(
        RoutedRequest(i, t.send_at, _random_ids((seed, 6, i), t.lengths.prompt), t.lengths.output, seed * 1_000_003 + i)
        for i, t in enumerate(traced)
    )
    description = f"Azure 2023 conversation trace, first {len(requests)} requests, unique prompts"
    return RoutingWorkload("azure-conv", requests, _trace_rate([r.send_at for r in requests]), description)


def _mooncake_rows(path: Path, max_requests: int) -> Iterable[dict]:
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if line_number > max_requests:
                return
            row = json.loads(line)
            if not {"timestamp", "input_length", "output_length", "hash_ids"} <= row.keys():
                raise ValueError(f"{path}:{line_number}: expected timestamp, input_length, output_length, hash_ids")
            yield row


def mooncake(path: str | Path, max_requests: int = 2000, max_prompt_tokens: int = 32_000, seed: int = 0) -> RoutingWorkload:
    """A Mooncake FAST'25 trace: each ``hash_ids`` entry becomes the same 512 token ids
    wherever it appears, so the trace's real prefix sharing reaches the engines' caches.
    Prompts longer than ``max_prompt_tokens`` are cut (the model's context is finite).
    """
    blocks: dict[int, tuple[int, ...]] = {}
    requests: list[RoutedRequest] = []
    for index, row in enumerate(_mooncake_rows(Path(path), max_requests)):
        ids: list[int] = []
        for hash_id in row["hash_ids"]:
            block = blocks.get(hash_id)
            if block is None:
                block = blocks[hash_id] = _random_ids((seed, 7, hash_id), MOONCAKE_BLOCK_TOKENS)
            ids.extend(block)
        length = max(1, min(int(row["input_length"]), len(ids), max_prompt_tokens))
        output = max(1, int(row["output_length"]))
        requests.append(RoutedRequest(index, row["timestamp"] / 1000.0, tuple(ids[:length]), output, seed * 1_000_003 + index))
    if not requests:
        raise ValueError(f"{path}: no rows")
    description = f"{Path(path).stem}, first {len(requests)} requests, prompts from hash_ids (512-token blocks)"
    return RoutingWorkload("mooncake", tuple(requests), _trace_rate([r.send_at for r in requests]), description)
