"""OpenAI request bodies -> engine requests, with vLLM's prompt rendering and checks.

Prompt tokens are what vLLM would feed its engine for Llama-3: the chat template rendered
and encoded without extra special tokens (the template itself starts with BOS) for chat,
BOS plus the encoded text for text completions, and token-id prompts as given. The checks
run in vLLM's order (context length first, then the sampling parameters) with its
messages, so a client sees the same 400 for the same mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.core.tokenizer import Tokenizer
from engines.core.types import EngineRequest, SamplingSpec
from engines.simulator.errors import bad_request, invalid_parameter
from engines.simulator.lora import LoraAdapter
from rayfleet.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields


@dataclass(slots=True)
class PreparedRequest:
    """Everything the generation handler needs besides the engine itself."""

    engine_request: EngineRequest
    model_name: str  # what responses report: the adapter's name or the served model's
    lora_name: str | None
    stream: bool
    include_usage: bool
    continuous_usage: bool


class RequestBuilder:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, served_model_name: str) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._served_model_name = served_model_name

    def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, add_special_tokens: bool = False
    ) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            [message.template_dict() for message in messages], add_generation_prompt=add_generation_prompt
        )
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def completion_prompt(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
        if isinstance(prompt, str):
            return self._tokenizer.encode(prompt, add_special_tokens=True)
        if len(prompt) > 1 and not isinstance(prompt[0], int):
            raise bad_request("Batched prompts are not supported by the simulator; send one prompt per request.")
        first = prompt[0]
        if isinstance(first, str):
            return self._tokenizer.encode(first, add_special_tokens=True)
        token_ids = list(prompt) if isinstance(first, int) else list(first)  # type: ignore[arg-type]
        if not token_ids:
            raise bad_request("The decoder prompt cannot be empty")
        out_of_vocabulary = [token_id for token_id in token_ids if not 0 <= token_id < self._tokenizer.vocab_size]
        if out_of_vocabulary:
            raise bad_request(f"Token id {out_of_vocabulary[0]} is out of vocabulary")
        return token_ids

    def chat(self, body: ChatCompletionRequest, request_id: str, adapter: LoraAdapter | None) -> PreparedRequest:
        prompt = self.chat_prompt(body.messages, body.add_generation_prompt)
        return self._prepare(body, body.requested_max_tokens, prompt, request_id, adapter)

    def completion(self, body: CompletionRequest, request_id: str, adapter: LoraAdapter | None) -> PreparedRequest:
        prompt = self.completion_prompt(body.prompt)  # type: ignore[arg-type]  # the model rejects a missing prompt
        return self._prepare(body, body.max_tokens, prompt, request_id, adapter)

    def _prepare(
        self,
        body: SamplingFields,
        max_tokens: int | None,
        prompt: list[int],
        request_id: str,
        adapter: LoraAdapter | None,
    ) -> PreparedRequest:
        resolved_max_tokens = self._check_lengths(len(prompt), max_tokens)
        self._check_sampling(body, resolved_max_tokens)
        options = body.stream_options
        include_usage = bool(body.stream and options is not None and options.include_usage)
        return PreparedRequest(
            engine_request=EngineRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=SamplingSpec(
                    max_tokens=resolved_max_tokens,
                    min_tokens=body.min_tokens,
                    ignore_eos=body.ignore_eos,
                    seed=body.seed,
                ),
                lora_id=adapter.lora_id if adapter is not None else 0,
                lora_name=adapter.name if adapter is not None else None,
            ),
            model_name=adapter.name if adapter is not None else self._served_model_name,
            lora_name=adapter.name if adapter is not None else None,
            stream=bool(body.stream),
            include_usage=include_usage,
            continuous_usage=include_usage and bool(options.continuous_usage_stats),  # type: ignore[union-attr]
        )

    def _check_lengths(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """vLLM's context-length checks; returns max_tokens with its default filled in."""
        max_model_len = self._max_model_len
        if num_prompt_tokens >= max_model_len:
            raise invalid_parameter(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages.",
                "input_tokens",
                num_prompt_tokens,
            )
        if max_tokens is None:
            return max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > max_model_len:
            raise invalid_parameter(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {num_prompt_tokens} input tokens "
                f"({max_tokens} > {max_model_len} - {num_prompt_tokens}).",
                "max_tokens",
                max_tokens,
            )
        return max_tokens

    @staticmethod
    def _check_sampling(body: SamplingFields, max_tokens: int) -> None:
        """vLLM's ``SamplingParams`` checks for the fields the simulator acts on."""
        n = 1 if body.n is None else body.n
        if n < 1:
            raise bad_request(f"n must be at least 1, got {n}.")
        if n > 1:
            raise bad_request(f"n must be 1 on the simulator, got {n}.", param="n")
        if max_tokens < 1:
            raise invalid_parameter(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
        if body.min_tokens < 0:
            raise bad_request(f"min_tokens must be greater than or equal to 0, got {body.min_tokens}.")
        if body.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {body.min_tokens}."
            )
