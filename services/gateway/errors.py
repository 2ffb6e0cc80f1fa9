"""Every refusal is JSON: `{"error": {"code", "message", ...}}`, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.errors import Error as NatsError
from starlette.exceptions import HTTPException

from corral.schemas.errors import FieldError, InvalidInput

log = logging.getLogger(__name__)
_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
    504: "timeout",
}


class ApiError(HTTPException):
    """An HTTP refusal with a code and a message (and extra fields for the body). It is a
    Starlette HTTPException so that FastAPI passes it through while it reads a body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        errors: list[FieldError] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status, message, dict(headers) if headers else None)
        self.code = code or _CODES.get(status, f"http_{status}")
        self.message = message
        self.errors = errors or []
        self.extra = extra

    @classmethod
    def invalid(cls, exc: InvalidInput, status: int = 422) -> ApiError:
        return cls(status, exc.reason, code="invalid", errors=exc.errors)


def error_body(
    code: str, message: str, errors: list[FieldError] | None = None, **extra: Any
) -> Any:
    error: dict[str, Any] = {"code": code, "message": message}
    if errors:
        error["errors"] = [{"loc": e.loc, "msg": e.msg} for e in errors]
    error.update({k: v for k, v in extra.items() if v is not None})
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: list[FieldError] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, errors, **extra), status_code=status, headers=headers
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, ApiError):
        return error_response(
            exc.status_code,
            exc.code,
            exc.message,
            headers=exc.headers,
            errors=exc.errors,
            **exc.extra,
        )
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = _CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, message, headers=exc.headers)


def _loc(parts: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI says where a value came from first: body, query, path, header
    parts = list(parts)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(_loc(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in exc.errors()
    ]
    summary = "; ".join(str(e) for e in errors[:5])
    return error_response(422, "invalid", f"invalid request: {summary}", errors=errors)


async def _bus_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("gateway: %s %s: the bus failed: %r", request.method, request.url.path, exc)
    return error_response(
        503,
        "unavailable",
        f"the bus did not answer ({exc.__class__.__name__}); try again shortly",
        headers={"Retry-After": "1"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("gateway: %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; the gateway's log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(NatsError, _bus_error)
    app.add_exception_handler(TimeoutError, _bus_error)
    app.add_exception_handler(Exception, _unexpected)
