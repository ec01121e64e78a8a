"""Every route the front forwards to an engine, in one table.

A `Route` says where its requests go on the engine, whether they are counted (admission control,
request and token metrics), where the guardrails find its text (`text`: chat messages, a
completion prompt, or none at all, said explicitly), and how its format is translated: NIM's
retrieval shapes (`shape`) or a whole other API onto chat completions (`translation`: OpenAI
Responses, Anthropic Messages). The guardrails refuse to run on a route whose text they do not
know, and `check` refuses, at start-up, a table with a generation route that declares no text:
so a new generation route gets the rails by construction. Adding a route is one line here (and,
for a new API, one module in `server.apis`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response

from inferd.guardrails.rails import GENERATION, NO_TEXT
from inferd.server import management as m
from inferd.server.apis.messages import MessagesTranslation
from inferd.server.apis.responses import ResponsesTranslation
from inferd.server.apis.translation import Translation
from inferd.server.retrieval import SHAPES, Shape

# Where the guardrails read a route's text (their own route keys), or that it has none.
CHAT, COMPLETION = GENERATION
TEXTS = frozenset({CHAT, COMPLETION, NO_TEXT})


@dataclass(frozen=True)
class Route:
    path: str  # the front's route
    engine_path: str  # the engine's route its (translated) requests go to
    text: str  # where its text is, for the rails: CHAT, COMPLETION or NO_TEXT
    counted: bool = True  # feeds the request and token metrics (every route holds a slot)
    shape: Shape | None = None  # NIM's retrieval formats (server.retrieval)
    translation: type[Translation] | None = None  # another API, onto chat completions
    api: str = "openai"  # whose error envelope its clients read
    tag: str = "openai"  # OpenAPI group


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", "/v1/chat/completions", CHAT),
    Route("/v1/completions", "/v1/completions", COMPLETION),
    Route(
        "/v1/responses",
        "/v1/chat/completions",
        CHAT,
        translation=ResponsesTranslation,
        tag="responses",
    ),
    Route(
        "/v1/messages",
        "/v1/chat/completions",
        CHAT,
        translation=MessagesTranslation,
        api="anthropic",
        tag="anthropic",
    ),
    Route("/v1/embeddings", "/v1/embeddings", NO_TEXT, shape=SHAPES["/v1/embeddings"]),
    # Reranking: Cohere's and Jina's format (vLLM's /rerank), and NIM's (server.retrieval).
    Route("/v1/rerank", "/rerank", NO_TEXT, shape=SHAPES["/v1/rerank"]),
    Route("/v1/ranking", "/rerank", NO_TEXT, shape=SHAPES["/v1/ranking"]),
    # Engines expose tokenize/detokenize without the /v1 prefix; inferd serves both.
    Route("/v1/tokenize", "/tokenize", NO_TEXT, counted=False),
    Route("/v1/detokenize", "/detokenize", NO_TEXT, counted=False),
    Route("/tokenize", "/tokenize", NO_TEXT, counted=False),
    Route("/detokenize", "/detokenize", NO_TEXT, counted=False),
)


@dataclass(frozen=True)
class Own:
    """A route the front answers itself (server.management)."""

    path: str
    method: str
    handler: Callable[[Request], Any]
    tag: str
    in_schema: bool = True


OWN: tuple[Own, ...] = (
    Own("/v1/models", "GET", m.list_models, "openai"),
    Own("/v1/models/{model:path}", "GET", m.retrieve_model, "openai"),
    Own("/v1/responses/{response_id}", "GET", m.get_response, "responses"),
    Own("/v1/responses/{response_id}", "DELETE", m.delete_response, "responses"),
    Own("/v1/messages/count_tokens", "POST", m.count_tokens, "anthropic"),
    Own("/v1/guardrails/check", "POST", m.guardrails_check, "guardrails"),
    Own("/v1/classify", "POST", m.classify, "guardrails"),
    Own("/v1/health/live", "GET", m.live, "health"),
    Own("/v1/health/ready", "GET", m.ready, "health"),
    Own("/v1/metadata", "GET", m.metadata, "management"),
    Own("/v1/version", "GET", m.version, "management"),
    Own("/v1/license", "GET", m.license_, "management"),
    Own("/v1/metrics", "GET", m.metrics_text, "management"),
    Own("/metrics", "GET", m.metrics_text, "management", in_schema=False),
)


def _openapi_body(model_ids: list[str]) -> dict[str, Any]:
    """The documented request body: a JSON object naming one of the served models; the rest is
    the engine's (OpenAI's) schema."""
    schema = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string", "enum": model_ids}},
        "additionalProperties": True,
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install(app: FastAPI, model_ids: list[str]) -> None:
    """Every route of both tables on `app`."""
    check()

    def forwarder(route: Route) -> Callable[[Request], Any]:
        async def forward(request: Request) -> Response:
            return await m.front(request).proxy.forward(request, route)

        return forward

    for route in ROUTES:
        app.add_api_route(
            route.path,
            forwarder(route),
            methods=["POST"],
            tags=[route.tag],
            openapi_extra=_openapi_body(model_ids),
            name=route.path,
        )
    for own in OWN:
        app.add_api_route(
            own.path,
            own.handler,
            methods=[own.method],
            tags=[own.tag],
            include_in_schema=own.in_schema,
            name=f"{own.method} {own.path}",
        )


def check(routes: tuple[Route, ...] = ROUTES) -> None:
    """Refuse a table where a route that generates text does not say where its text is."""
    for route in routes:
        if route.text not in TEXTS:
            raise ValueError(f"route {route.path} declares no text for the guardrails")
        generates = route.engine_path in (CHAT, COMPLETION) or route.translation is not None
        if generates and route.text == NO_TEXT:
            raise ValueError(f"route {route.path} generates text but says it has none")


def api_of(path: str) -> str:
    """Whose error envelope the clients of `path` read."""
    for route in ROUTES:
        if path == route.path or path.startswith(route.path + "/"):
            return route.api
    return "openai"
