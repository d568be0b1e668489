"""A request's prompt as the engine will see it: token ids and chained KV block hashes.

Prefix-aware routing only works if the gateway names blocks exactly as the engine does,
because a later index is fed from the engine's own KV events. So the prompt is rendered
the simulator's way (``engines.simulator.requests``): chat bodies through the chat
template encoded without extra special tokens (the template starts with BOS), text
prompts encoded with BOS, token-id prompts as given; and blocks are hashed as vLLM hashes
them (``kvcache.hashing.BlockHasher``), which only agrees with an engine configured with the
same algorithm, seed and block size. Both are memoised in ``RoutingRequest.derived`` (the
hashes per hasher) so a request is tokenised and hashed once however many strategies or
indexes ask.

A request for a LoRA adapter (``RoutingRequest.lora_name``, set by the gateway when the
requested model is not the endpoints' base model) is hashed with the adapter's name as the
extra key, as vLLM does, so its blocks never match the base model's.
"""

from __future__ import annotations

from typing import Any

from engines.core.tokenizer import Tokenizer, get_tokenizer
from kvcache.hashing import DEFAULT_BLOCK_SIZE, BlockHasher, lora_extra_keys
from serve_apps.routing.base import RoutingRequest

__all__ = ["DEFAULT_BLOCK_SIZE", "block_hashes", "prompt_token_ids", "render_prompt"]

_TOKEN_IDS_KEY = "prompt_token_ids"


def prompt_token_ids(request: RoutingRequest) -> list[int]:
    """The engine's prompt token ids for this request; empty when the body has no usable prompt."""
    token_ids = request.derived.get(_TOKEN_IDS_KEY)
    if token_ids is None:
        token_ids = render_prompt(request.body, get_tokenizer())
        request.derived[_TOKEN_IDS_KEY] = token_ids
    return token_ids


def block_hashes(request: RoutingRequest, hasher: BlockHasher) -> list[int]:
    """Chain hashes of the prompt's full blocks, equal to those in the KV events of an engine
    hashing like ``hasher``.

    The trailing partial block is left out: the engine only caches (and reports) full blocks.
    """
    key = f"prompt_block_hashes/{hasher.memo_key}"
    hashes = request.derived.get(key)
    if hashes is None:
        hashes = hasher.chain(prompt_token_ids(request), lora_extra_keys(request.lora_name))
        request.derived[key] = hashes
    return hashes


def render_prompt(body: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    """The simulator's prompt rendering, tolerant of malformed bodies (the engine rejects those).

    A body the engine would refuse gives an empty prompt rather than an error: routing it
    anywhere is fine, the engine answers the 400.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return []
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": _template_content(m.get("content"))} for m in messages],
            add_generation_prompt=body.get("add_generation_prompt", True) is not False,
        )
        return tokenizer.encode(text, add_special_tokens=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if isinstance(prompt[0], (str, list)) else prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and all(isinstance(token_id, int) for token_id in prompt):
        return list(prompt)
    return []


def _template_content(content: Any) -> str | list[dict[str, Any]] | None:
    """Message content in the shape the template reads: text parts keep their text, others vanish."""
    if isinstance(content, list):
        return [
            {"type": "text", "text": part.get("text") or ""}
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        ]
    return content if isinstance(content, str) else None
