"""vLLM's response and stream-chunk bodies for chat and text completions, as plain dicts.

Built as dicts and serialized with orjson because this is the hot path (pydantic models
would cost more than the simulated engine step); ``rayfleet.protocol.openai`` holds the
same shapes as models, and the API tests validate these dicts against them.

Field sets follow vLLM: a full response dumps every field (nulls included), a stream
chunk only the fields vLLM sets on it, and the trailing usage chunk drops nulls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True, frozen=True)
class ResponseIdentity:
    """What every body of one response repeats."""

    id: str
    created: int
    model: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def sse(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ResponseFormat(Protocol):
    """The differences between chat and text completions."""

    id_prefix: str
    chunk_object: str

    def response(self, identity: ResponseIdentity, text: str, finish_reason: str, usage: dict) -> dict: ...

    def opening_choice(self) -> dict | None: ...

    def choice(self, text: str, finish_reason: str | None) -> dict: ...


class ChatFormat:
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def response(self, identity: ResponseIdentity, text: str, finish_reason: str, usage: dict) -> dict:
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning_content": None,
        }
        return {
            "id": identity.id,
            "object": "chat.completion",
            "created": identity.created,
            "model": identity.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {**usage, "prompt_tokens_details": None},
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    def opening_choice(self) -> dict | None:
        """vLLM opens every chat stream with the role and empty content."""
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def choice(self, text: str, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        return choice


class CompletionFormat:
    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def response(self, identity: ResponseIdentity, text: str, finish_reason: str, usage: dict) -> dict:
        return {
            "id": identity.id,
            "object": "text_completion",
            "created": identity.created,
            "model": identity.model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {**usage, "prompt_tokens_details": None},
            "kv_transfer_params": None,
        }

    def opening_choice(self) -> dict | None:
        return None

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}


def chunk(response_format: ResponseFormat, identity: ResponseIdentity, choices: list[dict], usage: dict | None) -> dict:
    body = {
        "id": identity.id,
        "object": response_format.chunk_object,
        "created": identity.created,
        "model": identity.model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


CHAT = ChatFormat()
COMPLETION = CompletionFormat()
