"""One engine's configuration, and the command line that starts it.

The same ``EngineConfig`` starts a real ``vllm serve`` on a GPU node or the simulator
here: both take vLLM's flags, and the simulator adds a few of its own (the GPU profile to
model, the time scale and the fault knobs). Keeping one model for both is what makes the
simulator a drop-in stand-in: whatever rayfleet would pass to vLLM, it passes to the
simulator in the same words.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvcache.hashing import DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED, HASH_ALGOS, HashAlgo

EngineKind = Literal["sim", "vllm"]


class LoraModule(BaseModel):
    """An adapter loaded at start-up (vLLM's ``--lora-modules`` JSON form)."""

    name: str
    path: str
    base_model_name: str | None = None


class SimulatorOptions(BaseModel):
    """Flags only the simulator understands; never passed to vLLM."""

    model_config = ConfigDict(extra="forbid")

    gpu: str = Field("h100", description="GPU latency/memory profile: a100, h100, h200, l40s or instant")
    time_scale: float = Field(
        1.0,
        ge=0.0,
        description="wall seconds per modelled engine second: 1 is real time, 10 is ten times slower, "
        "0 answers as fast as the CPU allows",
    )
    seed: int = 0
    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="fraction of requests answered with a 500")
    added_latency_s: float = Field(0.0, ge=0.0, description="extra wall delay before each request is admitted")


class EngineConfig(BaseModel):
    """Everything needed to start one engine endpoint."""

    model_config = ConfigDict(extra="forbid")

    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8100
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    block_size: int = Field(16, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    num_gpu_blocks_override: int | None = Field(None, ge=1)  # replaces the memory-derived KV block count
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: HashAlgo = DEFAULT_HASH_ALGO
    # PYTHONHASHSEED of the engine process, not a flag: vLLM roots every block hash chain in
    # it, so engines (and the gateway) agree on hashes only when they share it. None leaves
    # the launcher's environment alone; unset there, vLLM draws a random root per process.
    hash_seed: str | None = DEFAULT_HASH_SEED
    enable_lora: bool = False
    max_loras: int = Field(1, ge=1)
    max_lora_rank: int = Field(16, ge=1)
    lora_modules: list[LoraModule] = Field(default_factory=list)
    kv_events_config: dict | None = None
    distributed_executor_backend: Literal["ray", "mp"] | None = None
    sim: SimulatorOptions = Field(default_factory=SimulatorOptions)

    @property
    def name(self) -> str:
        """The model name clients send (vLLM: the first served name, else the model path)."""
        return self.served_model_name or self.model

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """Variables the engine process needs on top of the launcher's environment."""
        return {"PYTHONHASHSEED": self.hash_seed} if self.hash_seed is not None else {}

    def vllm_args(self) -> list[str]:
        """vLLM's flags for this config, in the exact spelling of ``vllm serve --help``."""
        args = [
            "--host", self.host,
            "--port", str(self.port),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--block-size", str(self.block_size),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
        ]  # fmt: skip
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.num_gpu_blocks_override:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        args += ["--prefix-caching-hash-algo", self.prefix_caching_hash_algo]
        if self.enable_lora:
            args += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        for module in self.lora_modules:
            args += ["--lora-modules", module.model_dump_json(exclude_none=True)]
        if self.kv_events_config is not None:
            args += ["--kv-events-config", json.dumps(self.kv_events_config)]
        if self.distributed_executor_backend:
            args += ["--distributed-executor-backend", self.distributed_executor_backend]
        return args

    def simulator_args(self) -> list[str]:
        """The simulator's flags: vLLM's, then its own."""
        return self.vllm_args() + [
            "--gpu", self.sim.gpu,
            "--time-scale", str(self.sim.time_scale),
            "--seed", str(self.sim.seed),
            "--error-rate", str(self.sim.error_rate),
            "--added-latency", str(self.sim.added_latency_s),
        ]  # fmt: skip

    def command(self, kind: EngineKind) -> list[str]:
        """The full argv that starts this engine as a process."""
        if kind == "vllm":
            vllm = shutil.which("vllm")
            prefix = [vllm] if vllm else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
            return prefix + ["serve", self.model] + self.vllm_args()
        return [sys.executable, "-m", "engines.simulator", "serve", self.model] + self.simulator_args()


def add_engine_arguments(parser: argparse.ArgumentParser, simulator: bool) -> None:
    """Register vLLM's flags (and the simulator's when ``simulator``) on ``parser``.

    ``config_from_args`` turns the parsed namespace back into an ``EngineConfig``, so
    ``EngineConfig -> argv -> EngineConfig`` round-trips; a test holds us to that.
    """
    defaults = EngineConfig()
    parser.add_argument("model", nargs="?", default=defaults.model)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=defaults.enable_prefix_caching
    )
    parser.add_argument("--prefix-caching-hash-algo", choices=HASH_ALGOS, default=defaults.prefix_caching_hash_algo)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-loras", type=int, default=defaults.max_loras)
    parser.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank)
    parser.add_argument("--lora-modules", action="append", default=[], type=_parse_lora_module)
    parser.add_argument("--kv-events-config", type=json.loads, default=None)
    parser.add_argument("--distributed-executor-backend", choices=["ray", "mp"], default=None)
    if simulator:
        sim = SimulatorOptions()
        parser.add_argument("--gpu", default=sim.gpu)
        parser.add_argument("--time-scale", type=float, default=sim.time_scale)
        parser.add_argument("--seed", type=int, default=sim.seed)
        parser.add_argument("--error-rate", type=float, default=sim.error_rate)
        parser.add_argument("--added-latency", type=float, default=sim.added_latency_s)


def config_from_args(ns: argparse.Namespace) -> EngineConfig:
    """Build the config from a namespace parsed with ``add_engine_arguments``."""
    sim = SimulatorOptions(
        gpu=getattr(ns, "gpu", "h100"),
        time_scale=getattr(ns, "time_scale", 1.0),
        seed=getattr(ns, "seed", 0),
        error_rate=getattr(ns, "error_rate", 0.0),
        added_latency_s=getattr(ns, "added_latency", 0.0),
    )
    return EngineConfig(
        model=ns.model,
        served_model_name=ns.served_model_name,
        host=ns.host,
        port=ns.port,
        tensor_parallel_size=ns.tensor_parallel_size,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        num_gpu_blocks_override=ns.num_gpu_blocks_override,
        max_model_len=ns.max_model_len,
        enable_prefix_caching=ns.enable_prefix_caching,
        prefix_caching_hash_algo=ns.prefix_caching_hash_algo,
        enable_lora=ns.enable_lora,
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        lora_modules=ns.lora_modules,
        kv_events_config=ns.kv_events_config,
        distributed_executor_backend=ns.distributed_executor_backend,
        sim=sim,
    )


def _parse_lora_module(text: str) -> LoraModule:
    """vLLM accepts ``name=path`` or a JSON object; so do we."""
    if text.lstrip().startswith("{"):
        return LoraModule.model_validate_json(text)
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects name=path or JSON, got {text!r}")
    return LoraModule(name=name, path=path)
