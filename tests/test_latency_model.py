"""The step-time model against real GPU measurements and aiconfigurator's vLLM predictions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engines.core.latency import MIXED_STEP_FACTOR, StepShape, decode_ms, prefill_ms, step_ms
from engines.core.profiles import LLAMA_3_1_8B, GPU_PROFILES, get_gpu_profile, kv_capacity_tokens

TOLERANCE = 0.30


@dataclass(frozen=True)
class Reference:
    """One reference step: ``decodes`` sequences at ``context`` tokens each, plus an optional prefill chunk."""

    gpu: str
    ms: float
    decodes: int = 0
    context: int = 0
    prefill_new: int = 0
    prefill_cached: int = 0

    def shape(self) -> StepShape:
        shape = StepShape()
        for _ in range(self.decodes):
            shape.add_decode(self.context)
        if self.prefill_new:
            shape.add_prefill_chunk(self.prefill_new, self.prefill_cached)
        return shape


# Source: ../shared/reference/benchmarks.md §3, "GPU validation" table: measured step times of
# Llama-3-8B shapes (random BF16 weights, CUDA graphs, unfused kernels) on one H100 80GB / H200.
MEASURED = [
    Reference("h100", 7.3, decodes=1, context=1024),
    Reference("h100", 9.2, decodes=32, context=1024),
    Reference("h100", 14.3, decodes=128, context=1024),
    Reference("h100", 21.2, decodes=256, context=1024),
    Reference("h100", 13.4, decodes=32, context=4096),
    Reference("h100", 19.3, decodes=64, context=4096),
    Reference("h100", 15.8, prefill_new=512),
    Reference("h100", 55.5, prefill_new=2048),
    Reference("h100", 244.0, prefill_new=8192),
    Reference("h200", 5.7, decodes=1, context=1024),
    Reference("h200", 7.2, decodes=32, context=1024),
    Reference("h200", 10.8, decodes=128, context=1024),
    Reference("h200", 17.1, decodes=256, context=1024),
    Reference("h200", 10.0, decodes=32, context=4096),
    Reference("h200", 13.9, decodes=64, context=4096),
    Reference("h200", 15.0, prefill_new=512),
    Reference("h200", 55.2, prefill_new=2048),
    Reference("h200", 238.0, prefill_new=8192),
]

# Source: ../shared/reference/benchmarks.md §3, aiconfigurator-core 0.12.0 vLLM predictions for
# Llama-3.1-8B BF16 TP1 (the steps the bs1 fits cannot be checked on directly).
AICONFIGURATOR = [
    Reference("h100", 12.6, prefill_new=512, prefill_cached=1536),  # "prefill 2048 with 1536 cached"
    Reference("h100", 48.2, decodes=64, context=1024, prefill_new=2048),  # "2048 chunk + 64 decodes"
    Reference("h200", 12.0, prefill_new=512, prefill_cached=1536),
    Reference("h200", 45.5, decodes=64, context=1024, prefill_new=2048),
    Reference("a100", 38.5, prefill_new=512, prefill_cached=1536),
    Reference("a100", 132.0, decodes=64, context=1024, prefill_new=2048),
    Reference("l40s", 41.5, prefill_new=512, prefill_cached=1536),
    Reference("l40s", 161.0, decodes=64, context=1024, prefill_new=2048),
]


@pytest.mark.parametrize("ref", MEASURED + AICONFIGURATOR, ids=repr)
def test_step_time_within_tolerance_of_reference(ref: Reference) -> None:
    modelled = step_ms(get_gpu_profile(ref.gpu), ref.shape())
    assert abs(modelled - ref.ms) <= TOLERANCE * ref.ms, f"model {modelled:.1f} ms vs reference {ref.ms} ms"


def test_idle_step_and_instant_profile_cost_nothing() -> None:
    assert step_ms(get_gpu_profile("h100"), StepShape()) == 0.0
    busy = Reference("instant", 0.0, decodes=64, context=1024, prefill_new=2048).shape()
    assert step_ms(get_gpu_profile("instant"), busy) == 0.0


def test_prefill_chunks_share_one_fixed_cost_and_attend_to_computed_tokens() -> None:
    gpu = get_gpu_profile("h100")
    one = StepShape()
    one.add_prefill_chunk(1000, 0)
    two = StepShape()
    two.add_prefill_chunk(1000, 0)
    two.add_prefill_chunk(1000, 0)
    assert step_ms(gpu, two) == pytest.approx(2 * step_ms(gpu, one) - gpu.prefill_base_ms)
    # A cold chunk reduces to the bs1 fit; a chunk on cached tokens pays extra attention only.
    assert step_ms(gpu, one) == pytest.approx(4.54 + 17.5 + 0.78)
    later = StepShape()
    later.add_prefill_chunk(1000, 4000)
    assert step_ms(gpu, later) == pytest.approx(step_ms(gpu, one) + 0.78 * 1000 * 2 * 4000 / 1e6)


def test_mixed_step_is_discounted_sum_of_parts() -> None:
    gpu = get_gpu_profile("a100")
    shape = Reference("a100", 0.0, decodes=10, context=500, prefill_new=300, prefill_cached=100).shape()
    parts = decode_ms(gpu, 10, 5000) + prefill_ms(gpu, 300, 300 * (300 + 200))
    assert step_ms(gpu, shape) == pytest.approx(MIXED_STEP_FACTOR * parts)


@pytest.mark.parametrize(
    ("gpu", "tokens"), [("h100", 400_000), ("a100", 400_000), ("h200", 825_000), ("l40s", 190_000)]
)
def test_kv_capacity_matches_vllm_scale(gpu: str, tokens: int) -> None:
    capacity = kv_capacity_tokens(get_gpu_profile(gpu), LLAMA_3_1_8B, 0.9)
    assert abs(capacity - tokens) <= 0.03 * tokens


def test_tensor_parallel_frees_weight_memory_for_kv() -> None:
    gpu = get_gpu_profile("l40s")
    single = kv_capacity_tokens(gpu, LLAMA_3_1_8B, 0.9)
    double = kv_capacity_tokens(gpu, LLAMA_3_1_8B, 0.9, tensor_parallel_size=2)
    assert double > 2 * single
    assert kv_capacity_tokens(gpu, LLAMA_3_1_8B, 0.3) == 0


def test_unknown_gpu_lists_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        get_gpu_profile("tpu")
    for name in GPU_PROFILES:
        assert name in str(error.value)
    assert get_gpu_profile("H100").name == "h100"
