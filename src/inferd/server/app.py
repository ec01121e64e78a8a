"""The front: one ASGI app with the OpenAI routes (forwarded) and the management routes (its own).

Inference routes go through `proxy.Proxy` to the model's engine. Management routes answer from
what the front knows: liveness as soon as HTTP is served, readiness from each engine's supervisor,
metadata and licence from the catalog entry and cache provenance, metrics from inferd's registry
followed by each engine's own. The lifespan starts every engine's supervisor and stops them all on
shutdown, so no engine outlives the front.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from inferd import __version__
from inferd.errors import EngineNotReadyError
from inferd.observability.metrics import Metrics
from inferd.server import errors
from inferd.server.proxy import Proxy
from inferd.server.served import ModelTable, ServedModel
from inferd.server.supervisor import State

API_VERSION = "1.0.0"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Front route -> (engine route, counted in the request/token metrics). Engines expose
# tokenize/detokenize without the /v1 prefix.
FORWARDED = {
    "/v1/chat/completions": ("/v1/chat/completions", True),
    "/v1/completions": ("/v1/completions", True),
    "/v1/embeddings": ("/v1/embeddings", True),
    "/v1/tokenize": ("/tokenize", False),
    "/v1/detokenize": ("/detokenize", False),
    "/tokenize": ("/tokenize", False),
    "/detokenize": ("/detokenize", False),
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}},
                    "additionalProperties": True,
                }
            }
        },
    }
}


def _model_info(m: ServedModel) -> dict[str, Any]:
    sup = m.supervisor
    return {
        "id": m.id,
        "name": m.entry.name,
        "task": m.entry.task,
        "license": m.entry.license,
        "license_url": m.entry.license_url or None,
        "parameters": m.entry.parameters,
        "profile": {
            "id": m.profile.id,
            "tags": m.profile.tags,
            "description": m.profile.description,
        },
        "engine": {
            "name": sup.engine.name,
            "version": sup.engine_version,
            "state": sup.state.value,
        },
        "source": m.provenance.get("source"),
    }


def create_app(models: list[ServedModel], *, log_requests: bool = False) -> FastAPI:
    table = ModelTable(models)
    metrics = Metrics()
    for m in table:
        metrics.add_model(m.id, m.supervisor.engine.name)
    proxy = Proxy(table, metrics, log_requests=log_requests)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await proxy.open()
        assert proxy.session is not None
        for m in table:
            m.supervisor.start(proxy.session)
        try:
            yield
        finally:
            await asyncio.gather(*(m.supervisor.stop() for m in table))
            await proxy.close()

    app = FastAPI(
        title="inferd",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible inference microservice.",
    )
    app.state.models = table
    app.state.metrics = metrics
    errors.install(app)

    def forwarder(engine_path: str, counted: bool) -> Any:
        async def forward(request: Request) -> Response:
            return await proxy.forward(request, engine_path, counted)

        return forward

    for route, (engine_path, counted) in FORWARDED.items():
        app.add_api_route(
            route,
            forwarder(engine_path, counted),
            methods=["POST"],
            tags=["openai"],
            openapi_extra=_OPENAPI_BODY,
            name=route,
        )

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> JSONResponse:
        """Every ready model, as its engine describes it."""
        data: list[Any] = []
        assert proxy.session is not None
        for m in table:
            if m.supervisor.state is not State.READY:
                continue
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with proxy.session.get(m.supervisor.base_url + "/v1/models") as resp:
                    if resp.status == 200:
                        data += (await resp.json()).get("data", [])
        if not data:
            raise EngineNotReadyError("no model is ready yet; retry shortly")
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/v1/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        states = {m.id: m.supervisor.describe() for m in table}
        ok = all(m.supervisor.state is State.READY for m in table)
        body = {"status": "ready" if ok else "not_ready", "models": states}
        return JSONResponse(body, 200 if ok else 503, None if ok else {"Retry-After": "5"})

    @app.get("/v1/metadata", tags=["management"])
    async def metadata() -> dict[str, Any]:
        infos = [_model_info(m) for m in table]
        return {
            "inferd_version": __version__,
            "models": infos,
            # NIM's field names, so NIM tooling finds the selected profile where it looks.
            "selectedModelProfileId": infos[0]["profile"]["id"] if infos else None,
            "modelInfo": [{"shortName": i["id"], "modelUrl": None} for i in infos],
        }

    @app.get("/v1/version", tags=["management"])
    async def version() -> dict[str, str]:
        return {"release": __version__, "api": API_VERSION}

    @app.get("/v1/license", tags=["management"])
    async def license_() -> dict[str, Any]:
        return {
            "licenses": [
                {
                    "model": m.id,
                    "license": m.entry.license,
                    "url": m.entry.license_url or None,
                    "content": m.license_text,
                }
                for m in table
            ]
        }

    async def metrics_text() -> Response:
        for m in table:
            sup = m.supervisor
            metrics.engine_ready.labels(m.id, sup.engine.name).set(sup.state is State.READY)
            metrics.engine_restarts.labels(m.id, sup.engine.name).set(sup.restarts)
        parts = [metrics.render()]
        assert proxy.session is not None
        for m in table:
            sup = m.supervisor
            if sup.state is not State.READY:
                continue
            # Engine metrics pass through unchanged; a slow engine costs the scrape 2 s at most.
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with proxy.session.get(
                    sup.base_url + sup.engine.metrics_path, timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200:
                        parts.append(await resp.read())
        return Response(b"".join(parts), media_type=PROMETHEUS_TEXT)

    app.add_api_route("/v1/metrics", metrics_text, methods=["GET"], tags=["management"])
    app.add_api_route("/metrics", metrics_text, methods=["GET"], include_in_schema=False)
    return app
