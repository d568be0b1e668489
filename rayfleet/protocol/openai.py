"""The OpenAI wire format, as vLLM speaks it.

One module for the protocol, used by the simulator (which must answer exactly like vLLM),
the gateway (which must answer like the OpenAI API) and the benchmarks (which parse both).

Requests accept and ignore unknown fields, as vLLM does (it logs them and carries on), so
a client written for the OpenAI API never trips over a field we do not model. Responses
are modelled field for field after vLLM's, including its non-OpenAI extras
(``stop_reason``, ``max_model_len`` on model cards), so parsing one here tells a reader
exactly what a real engine sends.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ErrorInfo(BaseModel):
    """The body of an error: what the ``openai`` client turns into ``APIStatusError``."""

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``: the envelope OpenAI and current vLLM both use."""

    error: ErrorInfo


def error_body(message: str, type: str, code: int | str | None = None, param: str | None = None) -> bytes:
    """Serialize an error envelope; kept as bytes because both servers write raw bodies."""
    return orjson.dumps(ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump())


class OpenAIRequestModel(BaseModel):
    """Base of every request body: unknown fields are accepted and dropped, like vLLM."""

    model_config = ConfigDict(extra="ignore")


class OpenAIResponseModel(BaseModel):
    """Base of every response body: vLLM's extra fields survive a parse-and-dump round trip."""

    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- requests


class StreamOptions(OpenAIRequestModel):
    """``stream_options``; vLLM defaults ``include_usage`` to true once the object is present."""

    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ContentPart(OpenAIRequestModel):
    """One part of a multi-part message; only ``text`` parts carry prompt text."""

    type: str
    text: str | None = None


class ChatMessage(OpenAIRequestModel):
    """A conversation turn; ``content`` is a string or a list of typed parts."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict:
        """The plain-dict form chat templates consume."""
        if isinstance(self.content, list):
            return {"role": self.role, "content": [part.model_dump() for part in self.content]}
        return {"role": self.role, "content": self.content}


class SamplingFields(OpenAIRequestModel):
    """Fields shared by chat and text completions, including vLLM's sampling extras.

    Some (``stop``, ``temperature``...) change nothing in a simulated reply but are still
    declared, so that a wrongly typed value is refused as vLLM refuses it.
    """

    model: str | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    ignore_eos: bool = False
    min_tokens: int = 0

    @model_validator(mode="before")
    @classmethod
    def _stream_options_need_stream(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return data


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        """vLLM lets ``max_completion_tokens`` win over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: the prompt is text or token ids, alone or in a list."""

    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = 16

    @model_validator(mode="after")
    def _prompt_required(self) -> CompletionRequest:
        if self.prompt is None or (isinstance(self.prompt, list) and not self.prompt):
            raise ValueError("Either prompt or prompt_embeds must be provided and non-empty.")
        return self


class TokenizeCompletionRequest(OpenAIRequestModel):
    """``POST /tokenize`` with a text prompt; vLLM adds the BOS token by default here."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIRequestModel):
    """``POST /tokenize`` with messages, rendered through the chat template."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class DetokenizeRequest(OpenAIRequestModel):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(OpenAIRequestModel):
    """``POST /v1/load_lora_adapter``."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(OpenAIRequestModel):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str
    lora_int_id: int | None = None


# --------------------------------------------------------------------------- responses


class PromptTokenUsageInfo(OpenAIResponseModel):
    cached_tokens: int | None = None


class UsageInfo(OpenAIResponseModel):
    """Token accounting; vLLM fills ``prompt_tokens_details`` only with --enable-prompt-tokens-details."""

    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class AssistantMessage(OpenAIResponseModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: dict | None = None
    audio: dict | None = None
    function_call: dict | None = None
    tool_calls: list[dict] = Field(default_factory=list)
    reasoning_content: str | None = None


class ChatCompletionChoice(OpenAIResponseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIResponseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(OpenAIResponseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIResponseModel):
    """A text completion, and also each streamed chunk of one (same ``object``, as in vLLM)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelPermission(OpenAIResponseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIResponseModel):
    """One servable name: the base model (``parent`` null) or a LoRA adapter on it."""

    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIResponseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(OpenAIResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(OpenAIResponseModel):
    prompt: str


class VersionResponse(OpenAIResponseModel):
    version: str
