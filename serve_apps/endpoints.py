"""What the fleet knows about one engine endpoint: the registry's wire format."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


# Labels of an engine that publishes KV events: where to subscribe, replay, and its topic.
LABEL_KV_EVENTS = "rayfleet.io/kv-events"
LABEL_KV_EVENTS_REPLAY = "rayfleet.io/kv-events-replay"
LABEL_KV_EVENTS_TOPIC = "rayfleet.io/kv-events-topic"


class Endpoint(BaseModel):
    """One engine HTTP server (vLLM or the simulator) as the registry records it.

    ``models`` lists every name the endpoint answers to: its base model first, then any
    LoRA adapters loaded on it, so the gateway can route an adapter request to the
    endpoints that hold that adapter.
    """

    name: str = Field(description="unique endpoint name; shown to clients as target-pod")
    url: str = Field(description="base URL, e.g. http://10.0.0.5:8000")
    model: str = Field(description="the base model's served name")
    models: list[str] = Field(default_factory=list, description="every served name: base model and adapters")
    ready: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    source: Literal["pool", "static", "kubernetes"] = Field("pool", description="who registered it")
    owner: str = Field("", description="which registrant of its source holds it (a discovery replica's id)")

    def served_names(self) -> list[str]:
        return self.models or [self.model]


class RegistrySnapshot(BaseModel):
    """A versioned copy of the whole registry; gateways replace their view with it."""

    version: int
    endpoints: list[Endpoint]
