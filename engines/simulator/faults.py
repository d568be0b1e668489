"""Fault injection for reliability tests: simulator-only, never part of vLLM's API.

``--error-rate`` answers that fraction of completion requests (chat and text) with vLLM's
500 envelope, and ``--added-latency`` delays each one by that many wall seconds before the
engine sees it. Both can be changed at runtime with ``POST /sim/faults``; ``POST
/sim/crash`` kills the process on the spot, like an engine dying under load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class FaultSettings(BaseModel):
    """Body of ``POST /sim/faults`` and its answer; an omitted field keeps its value."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(None, ge=0.0, le=1.0)
    added_latency_s: float | None = Field(None, ge=0.0)


@dataclass(slots=True)
class FaultKnobs:
    error_rate: float
    added_latency_s: float
    rng: random.Random

    def should_fail(self) -> bool:
        return self.error_rate > 0.0 and self.rng.random() < self.error_rate

    def update(self, settings: FaultSettings) -> None:
        if settings.error_rate is not None:
            self.error_rate = settings.error_rate
        if settings.added_latency_s is not None:
            self.added_latency_s = settings.added_latency_s

    def settings(self) -> FaultSettings:
        return FaultSettings(error_rate=self.error_rate, added_latency_s=self.added_latency_s)
