"""The user API: AIBrix's four POST calls and their REST twins under ``/v1/users``.

AIBrix's routes answer in AIBrix's shapes, so its scripts keep working: ``{"message",
"user"}`` on success, ``{"detail": ...}`` on failure, 422 with FastAPI's error list for a
bad body. The one deliberate difference: a caller's mistake is always a 4xx, never a 500.
The REST routes answer in the OpenAI error shape the rest of the gateway uses. A store
outage is a 503 (not the caller's fault, and worth a retry).

Every call needs the admin token as ``Authorization: Bearer``. Nothing is written unless
the whole request is valid.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from rayfleet.protocol.openai import error_body
from rayfleet.protocol.users import (
    User,
    UserLimits,
    UserMessage,
    UserNameOnly,
    UserUpdate,
    UserWithUsage,
    key_digest,
)
from serve_apps.users.store import StoreError, UserStore, new_api_key

AIBRIX_PATHS = frozenset({"/CreateUser", "/ReadUser", "/UpdateUser", "/DeleteUser"})
REST_PREFIX = "/v1/users"


M = TypeVar("M", bound=BaseModel)


def is_user_api_path(path: str) -> bool:
    return path in AIBRIX_PATHS or path == REST_PREFIX or path.startswith(REST_PREFIX + "/")


@dataclass(slots=True)
class ApiResponse:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class _Refused(Exception):
    """A request the API answers with an error; carries the finished response."""

    def __init__(self, response: ApiResponse) -> None:
        self.response = response


def _json(status: int, payload: object) -> ApiResponse:
    return ApiResponse(status, orjson.dumps(payload))


def _openai_error(status: int, message: str, code: str) -> ApiResponse:
    kinds = {401: "authentication_error", 403: "permission_error", 503: "server_error"}
    return ApiResponse(status, error_body(message, kinds.get(status, "invalid_request_error"), code=code))


class UserApi:
    """Stateless over a ``UserStore``: every answer comes from the store."""

    def __init__(self, store: UserStore, admin_digest: str | None) -> None:
        """``admin_digest``: the admin token's ``key_digest``; None closes the API."""
        self.store = store
        self.admin_digest = admin_digest

    async def handle(self, method: str, path: str, authorization: str, body: bytes) -> ApiResponse:
        aibrix = path in AIBRIX_PATHS
        try:
            self._authorize(authorization, aibrix)
            if aibrix:
                if method != "POST":
                    raise _Refused(_json(405, {"detail": "Method Not Allowed"}))
                return await self._aibrix(path, body)
            return await self._rest(method, path.removeprefix(REST_PREFIX).strip("/"), body)
        except _Refused as refused:
            return refused.response
        except StoreError as exc:
            message = f"user store unavailable: {exc}"
            return _json(503, {"detail": message}) if aibrix else _openai_error(503, message, "store_unavailable")

    def _authorize(self, authorization: str, aibrix: bool) -> None:
        if self.admin_digest is None:
            message = "the user API is disabled: start rayfleet with --admin-token T (or set users.admin_token)"
            raise _Refused(_json(403, {"detail": message}) if aibrix else _openai_error(403, message, "admin_disabled"))
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(key_digest(token), self.admin_digest):
            message = "admin token required: send 'Authorization: Bearer <admin token>'"
            raise _Refused(_json(401, {"detail": message}) if aibrix else _openai_error(401, message, "invalid_admin_token"))

    # -- AIBrix ------------------------------------------------------------------------
    async def _aibrix(self, path: str, body: bytes) -> ApiResponse:
        if path == "/CreateUser":
            user = _parse_aibrix(User, body)
            if not await self.store.create_user(user):
                return _json(200, {"message": f"User: {user.name} exists", "user": orjson.loads(body)})
            return _message(f"Created User: {user.name}", user)
        if path == "/UpdateUser":
            user = _parse_aibrix(User, body)
            if not await self.store.update_user(user):
                return _json(404, {"detail": f"User: {user.name} does not exist"})
            return _message(f"Updated User: {user.name}", user)
        name = _parse_aibrix(UserNameOnly, body).name
        if path == "/ReadUser":
            user = await self.store.get_user(name)
            if user is None:
                return _json(404, {"detail": "user does not exist"})
            return _message(f"User: {name}", user)
        deleted = await self.store.delete_user(name)
        if deleted is None:
            return _json(404, {"detail": f"User: {name} does not exist"})
        return _message(f"Deleted User: {name}", deleted)

    # -- REST --------------------------------------------------------------------------
    async def _rest(self, method: str, rest: str, body: bytes) -> ApiResponse:
        parts = rest.split("/") if rest else []
        route: Callable[[], Awaitable[ApiResponse]] | None = None
        if not parts:
            route = {"GET": lambda: self._list(), "POST": lambda: self._create(body)}.get(method)
        elif len(parts) == 1:
            name = parts[0]
            route = {"GET": lambda: self._read(name), "DELETE": lambda: self._delete(name),
                     "PUT": lambda: self._update(name, body, partial=False),
                     "PATCH": lambda: self._update(name, body, partial=True)}.get(method)  # fmt: skip
        elif len(parts) == 2 and parts[1] == "keys":
            name = parts[0]
            route = {"GET": lambda: self._list_keys(name), "POST": lambda: self._issue_key(name)}.get(method)
        elif len(parts) == 3 and parts[1] == "keys" and method == "DELETE":
            route = lambda: self._revoke_key(parts[0], parts[2])  # noqa: E731
        if route is None:
            raise _Refused(_openai_error(404 if method in ("GET", "POST", "PUT", "PATCH", "DELETE") else 405,
                                         f"no route for {method} {REST_PREFIX}/{rest}".rstrip("/"), "not_found"))  # fmt: skip
        return await route()

    async def _list(self) -> ApiResponse:
        return _json(200, {"object": "list", "data": [u.model_dump() for u in await self.store.list_users()]})

    async def _create(self, body: bytes) -> ApiResponse:
        user = _parse_rest(User, body)
        if not await self.store.create_user(user):
            raise _Refused(_openai_error(409, f"user {user.name} already exists; PUT /v1/users/{user.name} changes it",
                                         "user_exists"))  # fmt: skip
        return _json(201, user.model_dump())

    async def _read(self, name: str) -> ApiResponse:
        user = await self._existing(name)
        usage = await self.store.usage(name)
        if usage is None:  # deleted between the two reads
            raise _Refused(_unknown(name))
        return _json(200, UserWithUsage(**user.model_dump(), usage=usage).model_dump())

    async def _update(self, name: str, body: bytes, partial: bool) -> ApiResponse:
        current = await self._existing(name)
        if partial:
            changes = _parse_rest(UserUpdate, body).model_dump(exclude_none=True)
        else:
            changes = _parse_rest(UserLimits, body).model_dump()
        user = current.model_copy(update=changes)
        if not await self.store.update_user(user):
            raise _Refused(_unknown(name))
        return _json(200, user.model_dump())

    async def _delete(self, name: str) -> ApiResponse:
        deleted = await self.store.delete_user(name)
        if deleted is None:
            raise _Refused(_unknown(name))
        return _json(200, deleted.model_dump())

    async def _issue_key(self, name: str) -> ApiResponse:
        issued, digest = new_api_key(name, time.time())
        if not await self.store.add_key(issued, digest):
            raise _Refused(_unknown(name))
        return _json(201, issued.model_dump())

    async def _list_keys(self, name: str) -> ApiResponse:
        await self._existing(name)
        return _json(200, {"object": "list", "data": [k.model_dump() for k in await self.store.list_keys(name)]})

    async def _revoke_key(self, name: str, key_id: str) -> ApiResponse:
        if not await self.store.delete_key(name, key_id):
            raise _Refused(_openai_error(404, f"user {name} has no API key {key_id}", "key_not_found"))
        return _json(200, {"id": key_id, "deleted": True})

    async def _existing(self, name: str) -> User:
        user = await self.store.get_user(name)
        if user is None:
            raise _Refused(_unknown(name))
        return user


def _unknown(name: str) -> ApiResponse:
    return _openai_error(404, f"user {name} does not exist", "user_not_found")


def _message(message: str, user: User) -> ApiResponse:
    return ApiResponse(200, UserMessage(message=message, user=user).model_dump_json().encode())


def _parse_aibrix(model: type[M], body: bytes) -> M:
    """FastAPI's answer to a bad body, as AIBrix gives it: 422 with the list of problems."""
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as exc:
        detail = [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        raise _Refused(_json(422, {"detail": detail})) from None


def _parse_rest(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise _Refused(_openai_error(400, f"invalid user request: {problems}", "invalid_request")) from None
