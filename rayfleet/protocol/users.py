"""The user API's wire format: AIBrix's four calls, their REST twins, and API keys.

AIBrix's metadata service takes ``{"name", "rpm", "tpm"}`` on ``/CreateUser``,
``/ReadUser``, ``/UpdateUser`` and ``/DeleteUser`` and answers ``{"message", "user"}``;
scripts written against it keep working here. Limits are bounded so a typo (or a
negative number) is refused instead of stored: the sliding window keeps one entry per
admitted request, so an RPM in the millions would be a memory commitment, not a limit.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_RPM = 1_000_000
MAX_TPM = 10**12  # exact in a Lua double (2^53) with room for a window's sum

Rpm = Annotated[int, Field(ge=0, le=MAX_RPM, description="requests per minute; 0: the default (100)")]
Tpm = Annotated[int, Field(ge=0, le=MAX_TPM, description="prompt + completion tokens per minute; 0: rpm x 1000")]
UserName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:+-]+$")]


class UserLimits(BaseModel):
    """A user's limits (``PUT /v1/users/{name}``); 0 means AIBrix's defaults (rpm 100, tpm = rpm x 1000)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: Rpm = 0
    tpm: Tpm = 0


class User(BaseModel):
    """What ``/CreateUser`` and ``POST /v1/users`` take, and what every read returns."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: UserName
    rpm: Rpm = 0
    tpm: Tpm = 0


class UserNameOnly(BaseModel):
    """``/ReadUser`` and ``/DeleteUser`` need only the name (AIBrix accepts the full body too)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: UserName


class UserUpdate(BaseModel):
    """``PATCH /v1/users/{name}``: the limits to change, the others kept."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: Rpm | None = None
    tpm: Tpm | None = None


class UserMessage(BaseModel):
    """AIBrix's success body: ``{"message": "Created User: alice", "user": {...}}``."""

    message: str
    user: User


class WindowUsage(BaseModel):
    """What a user has spent in the current sliding minute (in-flight reservations included)."""

    requests: int
    tokens: int
    rpm_limit: int
    tpm_limit: int


class UserWithUsage(User):
    """``GET /v1/users/{name}``: the user and the current window."""

    usage: WindowUsage


class ApiKeyInfo(BaseModel):
    """A key as listed: its id and when it was made; the secret itself is never stored."""

    id: str
    user: str
    created: float


class IssuedApiKey(ApiKeyInfo):
    """``POST /v1/users/{name}/keys``: the only time the key's secret is shown."""

    key: str


def key_digest(secret: str) -> str:
    """The SHA-256 (hex) by which rayfleet keeps API keys and may be given the admin token:
    a leaked store or a readable config then holds nothing usable."""
    return hashlib.sha256(secret.encode()).hexdigest()
