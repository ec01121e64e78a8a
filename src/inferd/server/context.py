"""Request ids: one per request, on every log line written while serving it, echoed back.

A pure ASGI middleware takes the client's `X-Request-Id` when it is sane (or makes one), stores it
in a context variable for the duration of the request, and adds it to the response headers. The
logging filter in `observability.logs` reads the same variable, so any log line, from any module,
carries the id of the request it was written for.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.observability.logs import request_id_var

_MAX = 128


def _sane(value: str) -> bool:
    return 0 < len(value) <= _MAX and value.isprintable() and value.isascii()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _sane(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def current_request_id() -> str:
    return request_id_var.get() or uuid.uuid4().hex
