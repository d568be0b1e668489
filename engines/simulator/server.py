"""The simulator's HTTP server: vLLM's OpenAI-compatible routes on aiohttp, plus ``/sim/*``.

Routes and answers follow ``vllm serve`` (see ``errors.py`` for the exact error texts).
Differences a client could notice, all deliberate:

- LoRA load/unload routes are always on (vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
  and ``--max-loras`` caps loaded adapters (see ``lora.py``).
- ``n`` must be 1 and a completions ``prompt`` may not be a batch of several prompts.
- ``/version`` adds a ``simulator`` key next to ``version``.
- ``/sim/faults`` and ``/sim/crash`` exist (see ``faults.py``).

KV events (``--kv-events-config``) and block hashes (``--prefix-caching-hash-algo``, the
``PYTHONHASHSEED`` environment variable) are vLLM's; see ``kv_events.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import traceback

import zmq
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter

from engines.config import EngineConfig
from engines.core.engine import EngineCore, EngineCoreConfig
from engines.core.tokenizer import Tokenizer, get_tokenizer
from engines.simulator.engine_loop import EngineLoop
from engines.simulator.errors import ApiError, bad_request
from engines.simulator.faults import FaultKnobs, FaultSettings
from engines.simulator.generation import GenerationRoutes
from engines.simulator.kv_events import ZmqKVEventPublisher
from engines.simulator.lora import LoraRegistry
from engines.simulator.metrics import MetricsEndpoint, RequestMetrics, SimulatorCollector
from engines.simulator.models import ServedModels
from engines.simulator.requests import RequestBuilder
from engines.simulator.web_io import api_route, json_response, read_json
from rayfleet.protocol.kv_events import KVEventsConfig
from rayfleet.protocol.openai import (
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadLoRAAdapterRequest,
)

# The vLLM release whose API the simulator mirrors; /version reports it.
VLLM_VERSION = "0.11.0"
SIMULATOR_NAME = "rayfleet-sim"
# Seconds in-flight requests get to finish after SIGTERM before the process exits anyway.
SHUTDOWN_GRACE_S = 5.0
MAX_BODY_BYTES = 64 * 1024 * 1024

_TOKENIZE_REQUEST = TypeAdapter(TokenizeChatRequest | TokenizeCompletionRequest)


def engine_core_config(config: EngineConfig) -> EngineCoreConfig:
    """The core's settings; the hash seed comes from the environment, as vLLM reads it."""
    return EngineCoreConfig(
        gpu=config.sim.gpu,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        num_gpu_blocks=config.num_gpu_blocks_override,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=config.max_model_len,
        enable_prefix_caching=config.enable_prefix_caching,
        prefix_caching_hash_algo=config.prefix_caching_hash_algo,
        hash_seed=os.environ.get("PYTHONHASHSEED"),
        seed=config.sim.seed,
    )


class SimulatorServer:
    """One simulated ``vllm serve``: the engine loop and the routes in front of it."""

    def __init__(self, config: EngineConfig, core: EngineCore, tokenizer: Tokenizer) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self._max_model_len = core.max_model_len
        self.loras = LoraRegistry(config.enable_lora, config.max_loras, config.name)
        for module in config.lora_modules:
            # A module's base_model_name is moot: vLLM only honours it when it names the served model.
            self.loras.load(module.name, module.path)
        self.models = ServedModels(config.name, config.model, core.max_model_len, self.loras)
        request_metrics = RequestMetrics(core.max_model_len)
        self.engine = EngineLoop(core, config.sim.time_scale, request_metrics, self._engine_failed)
        self.faults = FaultKnobs(
            error_rate=config.sim.error_rate,
            added_latency_s=config.sim.added_latency_s,
            rng=random.Random(config.sim.seed),
        )
        self._builder = RequestBuilder(tokenizer, core.max_model_len, config.name)
        self._generation = GenerationRoutes(self._builder, self.models, self.engine, tokenizer, self.faults)
        self._metrics = MetricsEndpoint(
            SimulatorCollector(
                model_name=config.name,
                requests=request_metrics,
                stats=core.stats,
                cache_config={
                    "block_size": str(config.block_size),
                    "enable_prefix_caching": str(config.enable_prefix_caching),
                    "gpu_memory_utilization": str(config.gpu_memory_utilization),
                    "num_gpu_blocks": str(core.num_gpu_blocks),
                },
                max_loras=config.max_loras if config.enable_lora else None,
                lora_activity=self.engine.lora_activity,
            )
        )
        self.stopped = asyncio.Event()
        self.exit_code = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        generation = self._generation
        routes = [
            web.post("/v1/chat/completions", generation.chat_completions),
            web.post("/v1/completions", generation.completions),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/version", self._version),
            web.get("/metrics", self._metrics_text),
            web.post("/tokenize", self._tokenize),
            web.post("/detokenize", self._detokenize),
            web.post("/reset_prefix_cache", self._reset_prefix_cache),
            web.post("/v1/load_lora_adapter", self._load_lora_adapter),
            web.post("/v1/unload_lora_adapter", self._unload_lora_adapter),
            web.get("/sim/faults", self._get_faults),
            web.post("/sim/faults", self._set_faults),
            web.post("/sim/crash", self._crash),
        ]
        app.add_routes([web.route(route.method, route.path, api_route(route.handler)) for route in routes])
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(self.models.model_list().model_dump())

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": VLLM_VERSION, "simulator": SIMULATOR_NAME})

    async def _metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request, _TOKENIZE_REQUEST.validate_json)
        self.models.resolve(body.model)
        if isinstance(body, TokenizeChatRequest):
            tokens = self._builder.chat_prompt(body.messages, body.add_generation_prompt, body.add_special_tokens)
        else:
            tokens = self._tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return json_response(
            {"count": len(tokens), "max_model_len": self._max_model_len, "tokens": tokens, "token_strs": None}
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request, DetokenizeRequest.model_validate_json)
        self.models.resolve(body.model)
        try:
            text = self._tokenizer.decode(body.tokens)
        except ValueError as error:
            raise bad_request(str(error)) from None
        return json_response({"prompt": text})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's dev-mode route; like vLLM it answers 200 even when blocks in use prevent the reset."""
        self.engine.core.reset_prefix_cache()
        return web.Response()

    async def _load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await read_json(request, LoadLoRAAdapterRequest.model_validate_json)
        self.loras.load(body.lora_name, body.lora_path, load_inplace=body.load_inplace)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def _unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await read_json(request, UnloadLoRAAdapterRequest.model_validate_json)
        self.loras.unload(body.lora_name)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults.settings().model_dump())

    async def _set_faults(self, request: web.Request) -> web.Response:
        self.faults.update(await read_json(request, FaultSettings.model_validate_json))
        return json_response(self.faults.settings().model_dump())

    async def _crash(self, request: web.Request) -> web.Response:
        os._exit(1)

    def _engine_failed(self, error: BaseException) -> None:
        """A dead engine takes the server down with it, as a dead EngineCore does in vLLM."""
        traceback.print_exception(error, file=sys.stderr)
        print("ERROR: engine loop died; shutting down", file=sys.stderr, flush=True)
        self.exit_code = 1
        self.stopped.set()


async def serve(config: EngineConfig) -> int:
    """Run until SIGTERM/SIGINT (exit code 0) or an engine failure (1); 2 if it cannot start."""
    publisher: ZmqKVEventPublisher | None = None
    try:
        kv_events = KVEventsConfig.model_validate(config.kv_events_config or {})
        if kv_events.publishing:
            publisher = ZmqKVEventPublisher(kv_events)
        core = EngineCore(engine_core_config(config), kv_event_sink=publisher.publish if publisher else None)
        server = SimulatorServer(config, core, get_tokenizer())
    # A bad flag combination, a --lora-modules entry refused, or a KV event endpoint that cannot be bound.
    except (ValueError, ApiError, zmq.ZMQError) as error:
        if publisher is not None:
            publisher.close()
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        return 2
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stopped.set)
    # aiohttp's shutdown waits up to shutdown_timeout twice (graceful, then after cancelling
    # the request), so half the grace each keeps the total within SHUTDOWN_GRACE_S.
    runner = web.AppRunner(
        server.app(), access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S / 2
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    server.engine.start()
    host, port = runner.addresses[0][:2]
    print(
        f"INFO: simulator ready on http://{host}:{port} "
        f"(gpu={config.sim.gpu}, time_scale={config.sim.time_scale}, kv blocks={core.num_gpu_blocks})",
        file=sys.stderr,
        flush=True,
    )
    await server.stopped.wait()
    await runner.cleanup()
    await server.engine.stop()
    if publisher is not None:
        publisher.close()
    return server.exit_code
