"""vLLM's error answers, word for word, so clients see the same failures from the simulator.

Every rejection the server makes is raised as an ``ApiError`` and rendered once, in the
route wrapper. The constructors below carry vLLM's exact messages and error types
(``vllm/entrypoints/openai/engine/serving.py``, ``vllm/sampling_params.py``,
``vllm/entrypoints/openai/models/serving.py`` and the FastAPI exception handlers).
"""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError

from rayfleet.protocol.openai import error_body

_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200


class ApiError(Exception):
    """A request failure with its HTTP status and vLLM's error envelope fields."""

    def __init__(self, status: HTTPStatus, message: str, type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, code=self.status.value, param=self.param)


def bad_request(message: str, param: str | None = None) -> ApiError:
    """vLLM's ``create_error_response`` default: a 400 ``BadRequestError``."""
    return ApiError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


def invalid_parameter(message: str, parameter: str, value: object) -> ApiError:
    """A ``VLLMValidationError``: vLLM's message gains ``(parameter=..., value=...)`` from its ``__str__``."""
    return bad_request(f"{message} (parameter={parameter}, value={value})", param=parameter)


def model_not_found(model: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "NotFoundError", "model")


def internal_error(message: str = "Internal server error") -> ApiError:
    return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, message, "InternalServerError")


def unsupported_media_type() -> ApiError:
    """vLLM's ``validate_json_request`` dependency, through its HTTPException handler."""
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    return ApiError(status, "Unsupported Media Type: Only 'application/json' is allowed", status.phrase)


def request_validation_failed(error: ValidationError) -> ApiError:
    """vLLM's ``RequestValidationError`` handler: type is the status phrase ("Bad Request"), not ``BadRequestError``.

    FastAPI reports locations under ``body``; pydantic here validates the body itself,
    so the prefix is added back to keep messages and ``param`` identical.
    """
    errors = error.errors(include_url=False)
    label = "error" if len(errors) == 1 else "errors"
    lines = [f"{len(errors)} validation {label}:"]
    for entry in errors[:_MAX_REPORTED_ERRORS]:
        shown = {"type": entry["type"], "loc": ("body", *entry["loc"]), "msg": entry["msg"]}
        if "input" in entry:
            shown["input"] = _summarize_input(entry["input"])
        lines.append(f"  {shown}")
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {len(errors) - _MAX_REPORTED_ERRORS} more {label}")
    param = ".".join(["body", *(str(part) for part in errors[0]["loc"])]) if errors else None
    return ApiError(HTTPStatus.BAD_REQUEST, "\n".join(lines), HTTPStatus.BAD_REQUEST.phrase, param)


def _summarize_input(value: object) -> object:
    """Bound what an error echoes back, as vLLM does, so a huge body cannot make a huge error."""
    if isinstance(value, (list, tuple, dict, set)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_ERROR_INPUT_CHARS else text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
