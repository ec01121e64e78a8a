"""The shape of a translated route: one request's translation between a front API (OpenAI
Responses, Anthropic Messages) and the engine's OpenAI chat completions.

The front turns the client's request into a chat-completions request (`request`), and from then
on the request takes the same path as `/v1/chat/completions`: limits, input rails, admission, the
engine, output rails. Only the answer is turned back: a whole chat answer by `answer`, a stream
event by event (`start` once, `event` per engine chunk, `end` after the engine's `[DONE]`). So the
guardrails, limits and metrics of chat completions apply to every translated route by
construction. A `Translation` is per-request state (ids, stream position, text so far): one
object per request, never shared.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class SSE:
    """One server-sent event: an optional `event:` name and its JSON `data:`."""

    event: str | None
    data: dict[str, Any]

    def encode(self) -> bytes:
        head = f"event: {self.event}\n".encode() if self.event else b""
        return head + b"data: " + json.dumps(self.data, separators=(",", ":")).encode() + b"\n\n"


class Translation(ABC):
    """One request's translation. Errors in the client's request raise `inferd.errors`
    (`InvalidRequestError` naming the field); the front writes them in the envelope its route
    names (`server.routes.Route.api`), and sends the request to the route's engine path."""

    def __init__(self, payload: dict[str, Any], model: str) -> None:
        self.payload = payload
        self.model = model

    @classmethod
    def create(cls, payload: dict[str, Any], model: str, **context: Any) -> Translation:
        """One request's translation; `context`: what the front holds for this API (the
        Responses store), passed by keyword; a translation takes what it needs."""
        return cls(payload, model)

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True

    @abstractmethod
    def request(self) -> dict[str, Any]:
        """The engine's chat-completions request for this client request (`model` kept)."""

    @abstractmethod
    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        """A whole chat-completions answer in this API's shape."""

    @abstractmethod
    def start(self) -> list[SSE]:
        """The events a stream opens with, sent before the engine's first chunk."""

    @abstractmethod
    def event(self, chunk: dict[str, Any]) -> list[SSE]:
        """The events for one engine `chat.completion.chunk` (the usage-only chunk too)."""

    @abstractmethod
    def end(self) -> list[SSE]:
        """The closing events, after the engine's `[DONE]`."""

    @abstractmethod
    def error_event(self, message: str, type_: str) -> list[SSE]:
        """What ends a stream that failed midway (engine gone, drain, output rail)."""

    # Chat fields of the translated request and the client's fields they come from, so that
    # a refusal of the chat request (limits, the engine) names the field the client sent.
    client_params: ClassVar[dict[str, str]] = {}

    def client_param(self, param: str | None) -> str | None:
        if param is None:
            return None
        head, dot, rest = param.partition(".")
        return self.client_params.get(head, head) + dot + rest

    def finished(self, answer: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called with this API's whole answer once it is complete (whole or streamed), e.g.
        to store it (Responses' `store`)."""

    def streamed(self) -> dict[str, Any] | None:
        """The whole answer a stream made, once `end` has closed it (None if not kept)."""
        return None
