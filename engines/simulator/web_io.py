"""Reading request bodies and writing error answers the way vLLM's FastAPI app does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import ValidationError

from engines.simulator.errors import ApiError, request_validation_failed, unsupported_media_type

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_JSON = "application/json"


async def read_json(request: web.Request, validate: Callable[[bytes], T]) -> T:
    """Validate a JSON body in one pass (pydantic parses the bytes itself).

    Like vLLM, a body that is not declared as JSON is a 415, and malformed JSON or a
    schema mismatch is a 400 with pydantic's errors, never a 422.
    """
    if request.content_type != _JSON:
        raise unsupported_media_type()
    raw = await request.read()
    try:
        return validate(raw)
    except ValidationError as error:
        raise request_validation_failed(error) from None


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON)


def api_route(handler: Handler) -> Handler:
    """Render any ``ApiError`` a handler raises as vLLM's error envelope."""

    @wraps(handler)
    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return web.Response(body=error.body(), status=error.status.value, content_type=_JSON)

    return route
