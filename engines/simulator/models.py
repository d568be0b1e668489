"""The names a client may put in ``model``: the served base model and its loaded adapters."""

from __future__ import annotations

from engines.simulator.errors import model_not_found
from engines.simulator.lora import LoraAdapter, LoraRegistry
from rayfleet.protocol.openai import ModelCard, ModelList, ModelPermission


class ServedModels:
    def __init__(self, served_name: str, model_path: str, max_model_len: int, loras: LoraRegistry) -> None:
        self._served_name = served_name
        self._model_path = model_path
        self._max_model_len = max_model_len
        self._loras = loras

    def resolve(self, model: str | None) -> LoraAdapter | None:
        """The adapter a request targets (None for the base model); 404 for an unknown name.

        Like vLLM, an omitted or empty ``model`` means the base model.
        """
        if not model or model == self._served_name:
            return None
        adapter = self._loras.get(model)
        if adapter is None:
            raise model_not_found(model)
        return adapter

    def model_list(self) -> ModelList:
        base = ModelCard(
            id=self._served_name,
            root=self._model_path,
            max_model_len=self._max_model_len,
            permission=[ModelPermission()],
        )
        adapters = [
            ModelCard(
                id=adapter.name, root=adapter.path, parent=adapter.base_model_name, permission=[ModelPermission()]
            )
            for adapter in self._loras.adapters()
        ]
        return ModelList(data=[base, *adapters])
