"""The gateway's errors, in the OpenAI error shape the ``openai`` client understands."""

from __future__ import annotations

from rayfleet.protocol.openai import error_body

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class GatewayError(Exception):
    """A request the gateway answers itself, with a status and an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers: list[tuple[bytes, bytes]] = []  # extra response headers (Retry-After, ...)

    def body(self) -> bytes:
        error_type = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return error_body(self.message, error_type, code=self.code, param=self.param)


def wrap_upstream_error(status: int, body: bytes) -> bytes:
    """Pass an engine's error body on, or wrap a non-OpenAI one (plain text) so clients can parse it."""
    if body.lstrip().startswith(b"{") and b'"error"' in body:
        return body
    text = body.decode("utf-8", "replace").strip() or f"engine answered HTTP {status}"
    return GatewayError(status, f"upstream error: {text[:500]}", code="upstream_error").body()
