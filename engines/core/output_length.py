"""What the simulated model says: how many tokens a request generates, and which ones.

A real model stops when it samples EOS; the simulator decides the reply length up front
from a seeded distribution shaped like chat replies, so a run is reproducible and a
request's length does not depend on which engine or step served it. Token ids come from a
per-request generator for the same reason: a preempted request that recomputes keeps the
tokens it already produced and continues the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import xxhash

from engines.core.tokenizer import NUM_WORD_TOKENS
from engines.core.types import FinishReason, SamplingSpec

# Lognormal reply lengths: median 200 tokens and a long tail (mean ~300, p90 ~640),
# between the Azure 2023 conversation trace (p50 129, mean 211) and ShareGPT replies
# (mean ~312, p90 ~629) in shared/reference/benchmarks.md §2.
OUTPUT_LENGTH_MEDIAN = 200.0
OUTPUT_LENGTH_SIGMA = 0.9

_MASK64 = (1 << 64) - 1
_UNIT = 2.0**-53
_STANDARD_NORMAL = NormalDist()
# Knuth's MMIX LCG: a few integer operations per token, and its high bits are good
# enough to pick a word id.
_LCG_MULTIPLIER = 6364136223846793005
_LCG_INCREMENT = 1442695040888963407


@dataclass(slots=True, frozen=True)
class OutputPlan:
    """A request's predetermined reply: its length and why it ends there."""

    num_tokens: int
    finish_reason: FinishReason  # LENGTH when the length is max_tokens, else STOP (an EOS)
    token_state: int  # seed of the request's token-id stream


def request_seed(spec: SamplingSpec, request_id: str, engine_seed: int) -> int:
    """The request's own seed if it set one (so it replays anywhere), else one from its id."""
    if spec.seed is not None:
        return spec.seed & _MASK64
    return xxhash.xxh3_64_intdigest(request_id.encode(), seed=engine_seed & _MASK64)


def plan_output(spec: SamplingSpec, seed: int) -> OutputPlan:
    if spec.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {spec.max_tokens}")
    if spec.ignore_eos:
        num_tokens = spec.max_tokens
    else:
        uniform = ((xxhash.xxh3_64_intdigest(b"output-length", seed=seed) >> 11) + 0.5) * _UNIT
        sampled = round(OUTPUT_LENGTH_MEDIAN * math.exp(OUTPUT_LENGTH_SIGMA * _STANDARD_NORMAL.inv_cdf(uniform)))
        num_tokens = min(max(sampled, spec.min_tokens, 1), spec.max_tokens)
    reason = FinishReason.LENGTH if num_tokens == spec.max_tokens else FinishReason.STOP
    return OutputPlan(num_tokens, reason, xxhash.xxh3_64_intdigest(b"token-ids", seed=seed))


def next_token(state: int) -> tuple[int, int]:
    """Advance a token stream: (new state, a word id; never a special token)."""
    state = (state * _LCG_MULTIPLIER + _LCG_INCREMENT) & _MASK64
    return state, (state >> 24) % NUM_WORD_TOKENS
