"""How long one engine step takes on the GPU, as pure functions of what was scheduled.

A step is described by a ``StepShape``, the few sums the closed-form model needs, which
the scheduler accumulates as it schedules; no per-request list is kept. Decode cost grows
with the batch size and the total context the batch attends to; prefill cost has one fixed
part per step, a linear part over all new tokens and a quadratic (attention) part per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.core.profiles import GpuProfile

# aiconfigurator's vLLM predictions put a chunked-prefill step (prefill chunks and decodes
# in one batch) at about 0.9x the sum of its parts: the two share one pass over the weights.
MIXED_STEP_FACTOR = 0.9


@dataclass(slots=True)
class StepShape:
    """The work in one step, in the terms of the latency model."""

    num_decode_seqs: int = 0
    decode_context_tokens: int = 0  # ΣL: context tokens the decoding sequences attend to
    num_prefill_chunks: int = 0
    prefill_new_tokens: int = 0  # uncached prompt tokens computed
    prefill_attention_units: int = 0  # Σ n·(n + 2c) over chunks of n new tokens on c computed ones

    def add_decode(self, context_tokens: int) -> None:
        self.num_decode_seqs += 1
        self.decode_context_tokens += context_tokens

    def add_prefill_chunk(self, new_tokens: int, computed_tokens: int) -> None:
        """A chunk of ``new_tokens`` attending causally to itself and ``computed_tokens`` earlier ones.

        Attention work is the area of that trapezoid, n·c + n²/2; doubled so that a cold
        chunk (c = 0) gives exactly n², the quadratic term of the bs1 prefill fit.
        """
        self.num_prefill_chunks += 1
        self.prefill_new_tokens += new_tokens
        self.prefill_attention_units += new_tokens * (new_tokens + 2 * computed_tokens)


def decode_ms(gpu: GpuProfile, num_seqs: int, context_tokens: int) -> float:
    """A decode-only step of ``num_seqs`` sequences attending to ``context_tokens`` in total."""
    if num_seqs == 0:
        return 0.0
    return gpu.decode_base_ms + gpu.decode_per_seq_ms * num_seqs + gpu.decode_per_ktoken_ms * context_tokens / 1e3


def prefill_ms(gpu: GpuProfile, new_tokens: int, attention_units: int, num_chunks: int = 1) -> float:
    """A prefill-only step; ``attention_units`` as accumulated by ``StepShape.add_prefill_chunk``."""
    if num_chunks == 0:
        return 0.0
    return (
        gpu.prefill_base_ms
        + gpu.prefill_per_ktoken_ms * new_tokens / 1e3
        + gpu.prefill_quadratic_ms * attention_units / 1e6
    )


def step_ms(gpu: GpuProfile, shape: StepShape) -> float:
    """The modelled duration of one step; an empty step costs nothing."""
    decode = decode_ms(gpu, shape.num_decode_seqs, shape.decode_context_tokens)
    prefill = prefill_ms(gpu, shape.prefill_new_tokens, shape.prefill_attention_units, shape.num_prefill_chunks)
    if shape.num_decode_seqs and shape.num_prefill_chunks:
        return MIXED_STEP_FACTOR * (decode + prefill)
    return decode + prefill
