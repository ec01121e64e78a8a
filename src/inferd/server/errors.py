"""The one place errors become HTTP: the OpenAI error envelope with the right status.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

`install(app)` maps inferd's typed errors, Starlette's HTTP errors (unknown route, wrong method)
and anything unexpected (500, logged with its traceback, never shown to the client) to that shape.
`from_engine` rewrites an engine's own error body into the same shape, keeping its message and
field, so clients see one error format whatever engine answered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from inferd.errors import InferdError
from inferd.server.apis.messages import error_body

log = logging.getLogger("inferd.server")

# OpenAI's `type` for each status family.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def envelope(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_body(status: int, openai: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI error envelope in Anthropic's: `{"type": "error", "error": {type, message}}`;
    the field at fault, if any, is named in the message (Anthropic's envelope has no `param`)."""
    err = openai.get("error") or {}
    message = str(err.get("message") or "error")
    param = err.get("param")
    if param and param not in message:
        message = f"{param}: {message}"
    return error_body(status, message)


def _body(api: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return anthropic_body(status, body) if api == "anthropic" else body


def error_response(exc: InferdError, api: str = "openai") -> JSONResponse:
    body = envelope(exc.message, exc.type, exc.code, exc.param)
    return JSONResponse(_body(api, exc.status, body), status_code=exc.status, headers=exc.headers())


def type_for(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def from_engine(status: int, body: bytes) -> dict[str, Any]:
    """An engine's error body in the OpenAI envelope (message and field kept, names normalised)."""
    message, param, code = (
        body.decode("utf-8", "replace").strip() or f"engine error {status}",
        None,
        None,
    )
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or message)
            raw_param = err.get("param")
            # vLLM names request-body fields "body.messages"; clients know them as "messages".
            param = str(raw_param).removeprefix("body.") if raw_param else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(err, str):
            message = err
    if code is None:
        code = {
            400: "invalid_request",
            404: "not_found",
            413: "request_too_large",
            502: "engine_error",
        }.get(status)
    return envelope(message, type_for(status), code, param)


def install(app: FastAPI, api_of: Callable[[str], str] = lambda _: "openai") -> None:
    """Map every error to its envelope; `api_of(path)` says whose ("openai" or "anthropic")."""

    @app.exception_handler(InferdError)
    async def _inferd(request: Request, exc: InferdError) -> JSONResponse:
        # One line per refused request, so an operator sees why clients fail (never the body).
        log.info(
            "%s %s refused: %d %s%s%s",
            request.method,
            request.url.path,
            exc.status,
            exc.code,
            f" (param {exc.param})" if exc.param else "",
            f": {exc}" if exc.status >= 500 else "",  # inferd's own words, never the request
        )
        return error_response(exc, api_of(request.url.path))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = (
                f"method {request.method} not allowed on {request.url.path}",
                "method_not_allowed",
            )
        else:
            message, code = str(exc.detail), None
        body = _body(
            api_of(request.url.path),
            exc.status_code,
            envelope(message, type_for(exc.status_code), code),
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
        body = envelope(message, "invalid_request_error", "invalid_request", param)
        return JSONResponse(_body(api_of(request.url.path), 400, body), 400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = envelope("internal error", "server_error", "internal_error")
        return JSONResponse(_body(api_of(request.url.path), 500, body), 500)
