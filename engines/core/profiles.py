"""What the simulated engine runs on: GPU step-time coefficients and the model's memory shape.

The coefficients are closed-form fits of aiconfigurator-core 0.12.0's vLLM kernel
predictions for Llama-3.1-8B BF16 at TP1 (shared/reference/benchmarks.md §3), checked
against measured H100/H200 steps in tests/test_latency_model.py. Only the 8B model is
profiled: the fits are per model, and rayfleet's benchmarks all use it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

GB = 1e9

# Per-GPU memory vLLM keeps outside weights and KV: activations of the profiling run,
# CUDA graphs and the allocator's slack. With it, H100 at 0.9 utilisation holds ~400k
# KV tokens, which is what vLLM reports for this model there.
ACTIVATION_RESERVE_BYTES = 2.5 * GB


class GpuProfile(BaseModel):
    """One GPU's memory and step-time coefficients (milliseconds, tokens in thousands).

    decode_ms  = decode_base_ms + decode_per_seq_ms·B + decode_per_ktoken_ms·ΣL/1k
    prefill_ms = prefill_base_ms + prefill_per_ktoken_ms·T/1k + prefill_quadratic_ms·(T/1k)²
    """

    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: float = Field(gt=0)
    decode_base_ms: float = Field(ge=0)
    decode_per_seq_ms: float = Field(ge=0)
    decode_per_ktoken_ms: float = Field(ge=0)
    prefill_base_ms: float = Field(ge=0)
    prefill_per_ktoken_ms: float = Field(ge=0)
    prefill_quadratic_ms: float = Field(ge=0)


class ModelProfile(BaseModel):
    """The model's footprint: what decides how many KV tokens fit next to the weights."""

    model_config = ConfigDict(frozen=True)

    name: str
    weight_bytes: float = Field(gt=0)
    kv_bytes_per_token: int = Field(gt=0)  # all layers, K and V, unsharded
    max_model_len: int = Field(gt=0)


LLAMA_3_1_8B = ModelProfile(
    name="meta-llama/Llama-3.1-8B-Instruct",
    weight_bytes=16.06 * GB,
    kv_bytes_per_token=2 * 32 * 8 * 128 * 2,  # K+V × 32 layers × 8 KV heads × head dim 128 × BF16
    max_model_len=131072,
)

_H100 = GpuProfile(
    name="h100",
    memory_bytes=80 * GB,
    decode_base_ms=6.41,
    decode_per_seq_ms=0.0112,
    decode_per_ktoken_ms=0.0405,
    prefill_base_ms=4.54,
    prefill_per_ktoken_ms=17.5,
    prefill_quadratic_ms=0.78,
)

GPU_PROFILES: dict[str, GpuProfile] = {
    "a100": GpuProfile(
        name="a100",
        memory_bytes=80 * GB,
        decode_base_ms=11.25,
        decode_per_seq_ms=0.0449,
        decode_per_ktoken_ms=0.0790,
        prefill_base_ms=7.84,
        prefill_per_ktoken_ms=54.8,
        prefill_quadratic_ms=1.49,
    ),
    "h100": _H100,
    "h200": GpuProfile(
        name="h200",
        memory_bytes=141 * GB,
        decode_base_ms=4.92,
        decode_per_seq_ms=0.0129,
        decode_per_ktoken_ms=0.0287,
        prefill_base_ms=2.69,
        prefill_per_ktoken_ms=19.2,
        prefill_quadratic_ms=0.59,
    ),
    "l40s": GpuProfile(
        name="l40s",
        memory_bytes=48 * GB,
        decode_base_ms=22.6,
        decode_per_seq_ms=0.0421,
        decode_per_ktoken_ms=0.180,
        prefill_base_ms=14.7,
        prefill_per_ktoken_ms=58.2,
        prefill_quadratic_ms=3.12,
    ),
    # Zero step time with an H100's memory: for tests and for measuring the relay itself.
    "instant": GpuProfile(
        name="instant",
        memory_bytes=_H100.memory_bytes,
        decode_base_ms=0.0,
        decode_per_seq_ms=0.0,
        decode_per_ktoken_ms=0.0,
        prefill_base_ms=0.0,
        prefill_per_ktoken_ms=0.0,
        prefill_quadratic_ms=0.0,
    ),
}


def get_gpu_profile(name: str) -> GpuProfile:
    try:
        return GPU_PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU profile {name!r}; valid: {', '.join(GPU_PROFILES)}") from None


def kv_capacity_tokens(
    gpu: GpuProfile, model: ModelProfile, gpu_memory_utilization: float, tensor_parallel_size: int = 1
) -> int:
    """KV tokens the engine can hold, the number vLLM logs as "GPU KV cache size".

    Each GPU gets ``memory · utilisation`` minus its shard of the weights and the
    activation reserve; what is left holds full-size tokens' KV. Tensor parallelism shards
    every token's KV over the GPUs, so the engine holds that many tokens times TP.
    A negative result means the model does not fit and is reported as 0.
    """
    free_per_gpu = (
        gpu.memory_bytes * gpu_memory_utilization - model.weight_bytes / tensor_parallel_size - ACTIVATION_RESERVE_BYTES
    )
    return max(0, int(free_per_gpu // model.kv_bytes_per_token) * tensor_parallel_size)
