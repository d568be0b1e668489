"""What every user store offers, and the one admission algorithm both stores implement.

A store keeps users, API keys and each user's sliding-minute windows. Admission is a single
atomic step in the store (a Lua script in Redis, an immediate transaction in SQLite), so no
two gateways can both take the last slot:

- RPM: a sliding log of admission times; a request is admitted while fewer than ``rpm``
  admissions lie in the last ``window_s`` seconds. So in *any* window of that length at
  most ``rpm`` requests are admitted, which a fixed window (AIBrix) or GCRA cannot promise.
- TPM: a sliding log of charges. Admission reserves an estimate of the request's tokens
  (prompt bytes / 4 plus its ``max_tokens``) and admits while charged + reserved tokens are
  below ``tpm``; when the response ends the reservation is replaced by the exact
  prompt + completion tokens, timed at the end. Concurrent requests therefore see each
  other's reservations instead of all finding an empty budget, and the request that
  crosses the limit is never cut off; the next one is refused (AIBrix's rule).

Limits of 0 mean AIBrix's defaults: rpm 100, tpm = rpm x 1000.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

from rayfleet.protocol.users import ApiKeyInfo, IssuedApiKey, User, WindowUsage, key_digest

WINDOW_S = 60.0
DEFAULT_RPM = 100
DEFAULT_TPM_PER_RPM = 1000
API_KEY_PREFIX = "rf-"


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, locked): not the caller's fault."""


class UserExists(Exception):
    pass


class UnknownUser(Exception):
    pass


Verdict = Literal["admitted", "rpm", "tpm", "unknown_user", "unknown_key"]


@dataclass(slots=True)
class Admission:
    """One admission decision with the numbers for the ``x-ratelimit-*`` headers."""

    verdict: Verdict
    user: str
    rpm_limit: int = 0
    requests: int = 0  # admitted in the window, this one included when admitted
    requests_reset_s: float = 0.0  # until the oldest counted request leaves the window
    tpm_limit: int = 0
    tokens: int = 0  # charged + reserved in the window
    tokens_reset_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.verdict == "admitted"


@dataclass(slots=True, frozen=True)
class Identity:
    """Who a request claims to be: a user name (``user`` header) or an API key's digest."""

    kind: Literal["user", "key"]
    value: str


def effective_limits(rpm: int, tpm: int) -> tuple[int, int]:
    rpm = rpm or DEFAULT_RPM
    return rpm, tpm or rpm * DEFAULT_TPM_PER_RPM


def new_api_key(user: str, now: float) -> tuple[IssuedApiKey, str]:
    """A fresh key for ``user`` and the digest to store; its id is a prefix of the digest."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_digest(key)
    return IssuedApiKey(id=digest[:16], user=user, created=now, key=key), digest


class UserStore(Protocol):
    """Users, keys and windows; every method may raise ``StoreError``."""

    async def create_user(self, user: User) -> bool:
        """Store a new user; False (and nothing changed) if the name is taken."""

    async def get_user(self, name: str) -> User | None: ...

    async def update_user(self, user: User) -> bool:
        """Replace the user's limits; False if there is no such user."""

    async def delete_user(self, name: str) -> User | None:
        """Remove the user, its keys and its windows; the removed user, or None."""

    async def list_users(self) -> list[User]: ...

    async def add_key(self, info: ApiKeyInfo, digest: str) -> bool:
        """Store a key for an existing user; False if the user does not exist."""

    async def list_keys(self, user: str) -> list[ApiKeyInfo]: ...

    async def delete_key(self, user: str, key_id: str) -> bool: ...

    async def usage(self, name: str) -> WindowUsage | None: ...

    async def admit(self, identity: Identity, admission_id: str, token_estimate: int) -> Admission:
        """Decide and, if admitted, count the request and reserve its tokens, atomically."""

    async def settle(self, user: str, admission_id: str, tokens: int, reserved: int) -> None:
        """Replace the admission's token reservation (``reserved``, its estimate) by what the
        response really used."""

    async def close(self) -> None: ...
