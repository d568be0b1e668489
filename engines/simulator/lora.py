"""Which LoRA adapters the simulated engine serves, with vLLM's load/unload rules and messages.

An adapter changes nothing about the simulated text; what it changes is cache identity:
its requests carry the adapter's name into the core, which hashes it into their KV blocks
as vLLM does, so they never match the base model's (or another adapter's) blocks even for
the same prompt. The adapter's id only travels in KV events, as vLLM's ``lora_id``.

Capacity is simplified on purpose: vLLM's ``--max-loras`` bounds the adapters active in
one batch while more wait in CPU memory; here it bounds the adapters loaded at all, and a
load beyond it is refused with a 400 until one is unloaded. That keeps "how many adapters
can this replica hold" a single number a router can reason about.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from http import HTTPStatus

from engines.simulator.errors import ApiError, bad_request


@dataclass(slots=True)
class LoraAdapter:
    name: str
    path: str
    lora_id: int  # 1, 2, ...: 0 is the base model
    base_model_name: str


def _invalid_user_input(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, "InvalidUserInput")


class LoraRegistry:
    """The loaded adapters of one server, by name."""

    def __init__(self, enabled: bool, max_loras: int, base_model_name: str) -> None:
        self._enabled = enabled
        self._max_loras = max_loras
        self._base_model_name = base_model_name
        self._adapters: dict[str, LoraAdapter] = {}
        self._ids = itertools.count(1)

    def get(self, name: str) -> LoraAdapter | None:
        return self._adapters.get(name)

    def adapters(self) -> list[LoraAdapter]:
        return list(self._adapters.values())

    def load(self, name: str, path: str, load_inplace: bool = False) -> LoraAdapter:
        """Register an adapter; reloading in place keeps its id (and so its cached blocks)."""
        if not self._enabled:
            raise bad_request("LoRA is not enabled. Use --enable-lora to enable LoRA.")
        if not name or not path:
            raise _invalid_user_input("Both 'lora_name' and 'lora_path' must be provided.")
        existing = self._adapters.get(name)
        if existing is not None and not load_inplace:
            raise _invalid_user_input(
                f"The lora adapter '{name}' has already been loaded. "
                "If you want to load the adapter in place, set 'load_inplace' to True."
            )
        if existing is None and len(self._adapters) >= self._max_loras:
            raise bad_request(
                f"Cannot load LoRA adapter '{name}': {self._max_loras} adapter(s) already loaded, "
                f"which is the --max-loras limit. Unload one first."
            )
        adapter = LoraAdapter(
            name=name,
            path=path,
            lora_id=existing.lora_id if existing is not None else next(self._ids),
            base_model_name=self._base_model_name,
        )
        self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> LoraAdapter:
        if not name:
            raise _invalid_user_input("'lora_name' needs to be provided to unload a LoRA adapter.")
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        return adapter
