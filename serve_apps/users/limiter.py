"""The gateway's side of users and limits: who is calling, may they, and what they spent.

It runs in every gateway replica and talks to the store directly (a Lua script in Redis,
a transaction in the local SQLite file), never through the user service's
DeploymentHandle: that hop costs ~3 ms, ten times the limiter's budget.

When the store fails, ``on_store_error`` decides: ``open`` admits without limits,
``closed`` answers 503. Either way the answer is immediate: after a failure the store is
left alone for ``store_retry_s`` (requests meanwhile get the failure answer at once), so an
outage costs at most one timeout per retry period instead of one per request, and the
limiter recovers by itself on the first success.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from serve_apps.asgi import Headers
from serve_apps.config import UsersConfig
from serve_apps.errors import GatewayError
from serve_apps.usage import Usage
from serve_apps.users.store import API_KEY_PREFIX, Admission, Identity, StoreError, UserStore, key_digest

logger = logging.getLogger(__name__)

BYTES_PER_PROMPT_TOKEN = 4  # over-estimates English prompt tokens (JSON syntax counts too), which is the safe side


@dataclass(slots=True)
class Ticket:
    """An admitted request: whose budget it is on and the headers its response carries."""

    user: str
    admission_id: str
    reserved: int  # tokens reserved against TPM at admission
    headers: Headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: Go-style durations such as ``250ms`` or ``59.5s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def ratelimit_headers(admission: Admission) -> Headers:
    return [
        (b"x-ratelimit-limit-requests", str(admission.rpm_limit).encode()),
        (b"x-ratelimit-remaining-requests", str(max(admission.rpm_limit - admission.requests, 0)).encode()),
        (b"x-ratelimit-reset-requests", _duration(admission.requests_reset_s).encode()),
        (b"x-ratelimit-limit-tokens", str(admission.tpm_limit).encode()),
        (b"x-ratelimit-remaining-tokens", str(max(admission.tpm_limit - admission.tokens, 0)).encode()),
        (b"x-ratelimit-reset-tokens", _duration(admission.tokens_reset_s).encode()),
    ]


def token_estimate(body_bytes: int, body: dict[str, Any], default_output: int) -> int:
    """What to reserve against TPM at admission: the prompt's bytes / 4 plus the output cap."""
    output = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(output, int) or isinstance(output, bool) or output < 0:
        output = default_output
    return body_bytes // BYTES_PER_PROMPT_TOKEN + output


class Limiter:
    """Identity, admission and settlement for one gateway replica."""

    def __init__(self, settings: UsersConfig, store: UserStore) -> None:
        self.settings = settings
        self.store = store
        self._admin_digest = settings.admin_digest()
        self._store_down_until = 0.0
        # Admission ids only need to be unique among one user's requests in a window:
        # a random per-process prefix and a counter, cheaper than a uuid4 per request.
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self.outcomes: collections.Counter[str] = collections.Counter()  # published on a timer

    def identify(self, headers: dict[str, str]) -> Identity | None:
        """The caller's identity from ``Authorization: Bearer`` or the ``user`` header; None
        for an anonymous request that is allowed through without limits.

        A bearer token that is not one of ours (the ``openai`` client always sends one,
        often ``EMPTY``) is ignored unless keys are required: then only rayfleet keys pass.
        """
        authorization = headers.get("authorization", "")
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        digest = key_digest(token) if token else None
        if digest is not None and digest == self._admin_digest:
            return None
        if token.startswith(API_KEY_PREFIX):
            return Identity("key", digest)
        if self.settings.require_api_keys:
            reason = "the API key is not valid" if token else "an API key is required"
            raise GatewayError(401, f"{reason}: send 'Authorization: Bearer rf-...' with a key issued by "
                               "POST /v1/users/{name}/keys", code="invalid_api_key")  # fmt: skip
        user = headers.get("user")
        if user:
            return Identity("user", user)
        if self.settings.anonymous == "reject":
            raise GatewayError(401, "requests must identify a user: send the 'user' header or an API key "
                               "('Authorization: Bearer rf-...')", code="missing_user")  # fmt: skip
        return None

    async def admit(self, identity: Identity, estimate: int) -> Ticket | None:
        """Admit (a ticket, or None when the store is down and limits fail open) or raise
        the 401 / 429 / 503 the client should get."""
        if time.monotonic() < self._store_down_until:
            return self._store_unavailable("store marked down after a recent failure")
        admission_id = f"{self._id_prefix}{next(self._ids):x}"
        try:
            admission = await self.store.admit(identity, admission_id, estimate)
        except Exception as exc:  # noqa: BLE001 - whatever a dying store raises, it is an outage
            self._store_down_until = time.monotonic() + self.settings.store_retry_s
            logger.warning("rate-limit store failed (%s: %s); failing %s for %.1fs", type(exc).__name__, exc,
                           self.settings.on_store_error, self.settings.store_retry_s, exc_info=not isinstance(exc, StoreError))  # fmt: skip
            return self._store_unavailable(str(exc) or type(exc).__name__)
        self._count(admission.verdict)
        if admission.admitted:
            return Ticket(admission.user, admission_id, estimate, ratelimit_headers(admission))
        if admission.verdict == "unknown_key":
            raise GatewayError(401, "the API key is not valid (revoked, or never issued)", code="invalid_api_key")
        if admission.verdict == "unknown_user":
            raise GatewayError(401, f"user: {admission.user} does not exist; an admin creates it with "
                               "POST /v1/users (or /CreateUser)", code="unknown_user")  # fmt: skip
        limit = admission.rpm_limit if admission.verdict == "rpm" else admission.tpm_limit
        reset_s = admission.requests_reset_s if admission.verdict == "rpm" else admission.tokens_reset_s
        error = GatewayError(429, f"user: {admission.user} has exceeded {admission.verdict.upper()}: {limit}",
                             code="rate_limit_exceeded")  # fmt: skip
        error.headers = [
            (b"retry-after", str(max(math.ceil(reset_s), 1)).encode()),
            (b"x-error-%s-exceeded" % admission.verdict.encode(), b"true"),
            *ratelimit_headers(admission),
        ]
        raise error

    def _store_unavailable(self, reason: str) -> None:
        self._count("store_error_" + self.settings.on_store_error)
        if self.settings.on_store_error == "open":
            return None
        error = GatewayError(503, f"rate limits cannot be checked right now ({reason}); retry shortly",
                             code="rate_limiter_unavailable")  # fmt: skip
        error.headers = [(b"retry-after", str(max(math.ceil(self.settings.store_retry_s), 1)).encode())]
        raise error

    async def settle(self, ticket: Ticket, usage: Usage) -> None:
        """Charge the response's prompt + completion tokens in place of the reservation."""
        if time.monotonic() < self._store_down_until:
            logger.warning("rate-limit store down: %d tokens of %s not charged", usage.total_tokens, ticket.user)
            return
        try:
            await self.store.settle(ticket.user, ticket.admission_id, usage.total_tokens, ticket.reserved)
        except Exception as exc:  # noqa: BLE001 - as in admit: the response is already sent
            self._store_down_until = time.monotonic() + self.settings.store_retry_s
            logger.warning("rate-limit store failed while charging %s (%s: %s)", ticket.user, type(exc).__name__, exc,
                           exc_info=not isinstance(exc, StoreError))  # fmt: skip

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
