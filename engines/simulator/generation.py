"""``/v1/chat/completions`` and ``/v1/completions``: admission, streaming and the final answer.

A request leaves the engine whichever way its handler ends: finished, or aborted in the
``finally`` when the client disconnects (aiohttp cancels the handler, or a stream write
finds the connection reset), so a vanished client frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from engines.core.tokenizer import Tokenizer
from engines.simulator.engine_loop import EngineLoop, RequestHandle
from engines.simulator.errors import internal_error
from engines.simulator.faults import FaultKnobs
from engines.simulator.models import ServedModels
from engines.simulator.requests import PreparedRequest, RequestBuilder
from engines.simulator.responses import (
    CHAT,
    COMPLETION,
    SSE_DONE,
    ResponseFormat,
    ResponseIdentity,
    chunk,
    sse,
    usage,
)
from engines.simulator.web_io import json_response, read_json
from rayfleet.protocol.openai import ChatCompletionRequest, CompletionRequest

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}

Prepare = Callable[[str], PreparedRequest]


class GenerationRoutes:
    def __init__(
        self,
        builder: RequestBuilder,
        models: ServedModels,
        engine: EngineLoop,
        tokenizer: Tokenizer,
        faults: FaultKnobs,
    ) -> None:
        self._builder = builder
        self._models = models
        self._engine = engine
        self._tokenizer = tokenizer
        self._faults = faults
        # Engine ids only need to be unique in this process; a counter is cheaper than a uuid
        # and makes a run's output lengths reproducible (the core seeds them by request id).
        self._engine_ids = itertools.count()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, ChatCompletionRequest.model_validate_json)
        adapter = self._models.resolve(body.model)
        return await self._generate(request, CHAT, lambda engine_id: self._builder.chat(body, engine_id, adapter))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, CompletionRequest.model_validate_json)
        adapter = self._models.resolve(body.model)
        return await self._generate(
            request, COMPLETION, lambda engine_id: self._builder.completion(body, engine_id, adapter)
        )

    async def _generate(
        self, request: web.Request, response_format: ResponseFormat, prepare: Prepare
    ) -> web.StreamResponse:
        prepared = prepare(str(next(self._engine_ids)))
        if self._faults.should_fail():
            raise internal_error()
        if self._faults.added_latency_s > 0:
            await asyncio.sleep(self._faults.added_latency_s)
        # vLLM names the response after X-Request-Id when the client sends one.
        base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        identity = ResponseIdentity(response_format.id_prefix + base_id, int(time.time()), prepared.model_name)
        handle = self._engine.submit(prepared.engine_request, prepared.stream, prepared.lora_name)
        try:
            if prepared.stream:
                return await self._stream(request, response_format, identity, prepared, handle)
            output = await handle.outputs.get()
            text = self._tokenizer.decode(handle.token_ids)
            body = response_format.response(
                identity, text, output.finish_reason.value, usage(handle.num_prompt_tokens, len(handle.token_ids))
            )
            return json_response(body)
        finally:
            self._engine.abort(handle)

    async def _stream(
        self,
        request: web.Request,
        response_format: ResponseFormat,
        identity: ResponseIdentity,
        prepared: PreparedRequest,
        handle: RequestHandle,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        decode = self._tokenizer.decode
        prompt_tokens = handle.num_prompt_tokens
        continuous = prepared.continuous_usage
        completion_tokens = 0
        opening = response_format.opening_choice()
        try:
            while True:
                output = await handle.outputs.get()
                if opening is not None:  # chat announces the role with the first output, as vLLM does
                    opening_usage = usage(prompt_tokens, 0) if continuous else None
                    await response.write(sse(chunk(response_format, identity, [opening], opening_usage)))
                    opening = None
                completion_tokens += len(output.new_token_ids)
                finish_reason = output.finish_reason.value if output.finished else None
                choice = response_format.choice(decode(output.new_token_ids), finish_reason)
                chunk_usage = usage(prompt_tokens, completion_tokens) if continuous else None
                await response.write(sse(chunk(response_format, identity, [choice], chunk_usage)))
                if output.finished:
                    break
            if prepared.include_usage:
                await response.write(sse(chunk(response_format, identity, [], usage(prompt_tokens, completion_tokens))))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left mid-stream; the caller's finally aborts the request
        return response
