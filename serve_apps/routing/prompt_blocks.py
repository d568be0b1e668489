"""A request's prompt as the engine will see it: token ids and chained KV block hashes.

Prefix-aware routing only works if the gateway names blocks exactly as the engine does,
because a later index is fed from the engine's own KV events. So the prompt is rendered
the simulator's way (``engines.simulator.requests``): chat bodies through the chat
template encoded without extra special tokens (the template starts with BOS), text
prompts encoded with BOS, token-id prompts as given; and blocks are hashed with the
engine's ``hash_block_tokens`` chained from ``ROOT_BLOCK_HASH``. Both are memoised in
``RoutingRequest.derived`` so a request is tokenised and hashed once however many
strategies or indexes ask.

Requests are hashed as the base model (LoRA id 0): the gateway does not know which id an
engine gave an adapter, so a LoRA request's hashes will not match that engine's blocks.
"""

from __future__ import annotations

from typing import Any

from engines.core.kv_cache import ROOT_BLOCK_HASH, hash_block_tokens
from engines.core.tokenizer import Tokenizer, get_tokenizer
from serve_apps.routing.base import RoutingRequest

DEFAULT_BLOCK_SIZE = 16
BASE_MODEL_LORA_ID = 0
_TOKEN_IDS_KEY = "prompt_token_ids"
_BLOCK_HASHES_KEY = "prompt_block_hashes/{block_size}"


def prompt_token_ids(request: RoutingRequest) -> list[int]:
    """The engine's prompt token ids for this request; empty when the body has no usable prompt."""
    token_ids = request.derived.get(_TOKEN_IDS_KEY)
    if token_ids is None:
        token_ids = render_prompt(request.body, get_tokenizer())
        request.derived[_TOKEN_IDS_KEY] = token_ids
    return token_ids


def block_hashes(request: RoutingRequest, block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """Chain hashes of the prompt's full blocks, equal to the engine's for the same prompt.

    The trailing partial block is left out: the engine only caches (and reports) full blocks.
    """
    key = _BLOCK_HASHES_KEY.format(block_size=block_size)
    hashes = request.derived.get(key)
    if hashes is None:
        hashes = chain_hashes(prompt_token_ids(request), block_size)
        request.derived[key] = hashes
    return hashes


def chain_hashes(token_ids: list[int], block_size: int) -> list[int]:
    hashes: list[int] = []
    parent = ROOT_BLOCK_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], BASE_MODEL_LORA_ID)
        hashes.append(parent)
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
