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
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from inferd import __version__
from inferd.config import Settings
from inferd.errors import EngineNotReadyError, InvalidRequestError
from inferd.guardrails.config import GuardrailsConfig
from inferd.guardrails.jailbreak import Training
from inferd.guardrails.rails import Guardrails
from inferd.guardrails.texts import guardrail_texts
from inferd.observability.metrics import Metrics
from inferd.server import errors, retrieval
from inferd.server.admission import Admission, Limits
from inferd.server.context import RequestIdMiddleware
from inferd.server.guard_models import ServiceGuardModels
from inferd.server.keys import KeyRing
from inferd.server.proxy import Proxy, parse_body
from inferd.server.retrieval import SHAPES, Shape
from inferd.server.served import ModelTable, ServedModel
from inferd.server.supervisor import State

log = logging.getLogger("inferd.guardrails")
API_VERSION = "1.0.0"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Front route -> (engine route, counted in the request/token metrics). Engines expose
# tokenize/detokenize without the /v1 prefix.
FORWARDED = {
    "/v1/chat/completions": ("/v1/chat/completions", True),
    "/v1/completions": ("/v1/completions", True),
    "/v1/embeddings": ("/v1/embeddings", True),
    # Reranking: Cohere's and Jina's format (vLLM's /rerank), and NIM's (server.retrieval).
    "/v1/rerank": ("/rerank", True),
    "/v1/ranking": ("/rerank", True),
    "/v1/tokenize": ("/tokenize", False),
    "/v1/detokenize": ("/detokenize", False),
    "/tokenize": ("/tokenize", False),
    "/detokenize": ("/detokenize", False),
}


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
        **retrieval.describe(m.entry),
    }


def create_app(
    models: list[ServedModel],
    settings: Settings | None = None,
    keys: KeyRing | None = None,
    guards_config: GuardrailsConfig | None = None,
    jailbreak_training: Training | None = None,
) -> FastAPI:
    """The front for `models`. `keys`: when it holds active keys, inference routes need one.
    `guards_config`: the rails applied inline (and the defaults of /v1/guardrails/check);
    `jailbreak_training`: where the jailbreak rail's classifier is (or is trained into)."""
    settings = settings or Settings()
    table = ModelTable(models)
    metrics = Metrics()
    guards = Guardrails(
        guards_config or GuardrailsConfig(), metrics, served={m.id: m.entry.task for m in table}
    )
    if guards.jailbreak_model is not None and jailbreak_training is None:
        raise ValueError("the jailbreak rail needs jailbreak_training")
    for m in table:
        metrics.add_model(m.id, m.supervisor.engine.name)
        running = settings.max_running or m.profile.max_running
        queue = settings.max_queue if settings.max_queue is not None else 2 * running
        limits = Limits(running, queue, settings.queue_timeout_s)
        m.admission = Admission(m.id, limits, metrics.requests_running, metrics.requests_waiting)
    proxy = Proxy(
        table,
        metrics,
        keys=keys,
        max_body_bytes=settings.max_body_bytes,
        log_requests=settings.log_requests,
        guards=guards if guards.active else None,
    )
    # Output rails' calls skip admission (their request holds a slot, maybe of the very engine
    # it asks); input rails and the check routes wait for one like any request.
    guards.models = ServiceGuardModels(proxy, table, admit=False)
    guards.admitted = checks = ServiceGuardModels(proxy, table, admit=True)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await proxy.open()
        assert proxy.session is not None
        for m in table:
            m.supervisor.start(proxy.session)
        training = None
        if jailbreak_training is not None and guards.jailbreak_model is not None:
            training = asyncio.create_task(_prepare_jailbreak(jailbreak_training))
        try:
            yield
        finally:
            if training is not None:
                training.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await training
            await asyncio.gather(*(m.supervisor.stop() for m in table))
            await proxy.close()

    async def _prepare_jailbreak(training: Training) -> None:
        """Once the embedding engine answers: load the classifier, or train it (once)."""
        embedder = table.lookup(guards.jailbreak_model)
        await embedder.supervisor.ready.wait()
        try:
            await guards.prepare_jailbreak(training.data, training.probe_file)
        except Exception as exc:  # a service that cannot run its rails must not look ready
            guards.state = f"failed: the jailbreak classifier could not be prepared: {exc}"
            guards.failed.set()

    app = FastAPI(
        title="inferd",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible inference microservice.",
    )
    app.state.models = table
    app.state.metrics = metrics
    app.state.proxy = proxy
    app.state.guards = guards
    errors.install(app)
    app.add_middleware(RequestIdMiddleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # CORS is off unless origins are named
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )

    def forwarder(engine_path: str, counted: bool, shape: Shape | None) -> Any:
        async def forward(request: Request) -> Response:
            return await proxy.forward(request, engine_path, counted, shape)

        return forward

    for route, (engine_path, counted) in FORWARDED.items():
        app.add_api_route(
            route,
            forwarder(engine_path, counted, SHAPES.get(route)),
            methods=["POST"],
            tags=["openai"],
            openapi_extra=_openapi_body([m.id for m in table]),
            name=route,
        )

    @app.post("/v1/guardrails/check", tags=["guardrails"])
    async def guardrails_check(request: Request) -> dict[str, Any]:
        """Each named rail over `text` (or the messages' text): one verdict per rail."""
        proxy.authorize(request)
        payload = parse_body(await proxy.read_body(request))
        texts = guardrail_texts(payload)
        rails = payload.get("rails")
        if not isinstance(rails, list) or not all(isinstance(r, str) for r in rails):
            raise InvalidRequestError("rails must be a list of rail names", param="rails")
        unknown = sorted(set(payload) - {"text", "messages", "rails"})
        if unknown:
            raise InvalidRequestError(f"unknown field {unknown[0]}", param=unknown[0])
        verdicts = await guards.check(texts, rails, via=checks)
        return {
            "blocked": any(v.blocked for v in verdicts),
            "rails": [v.as_dict() for v in verdicts],
        }

    @app.post("/v1/classify", tags=["guardrails"])
    async def classify(request: Request) -> dict[str, Any]:
        """NemoGuard JailbreakDetect: `{input}` -> `{jailbreak, score}`."""
        proxy.authorize(request)
        payload = parse_body(await proxy.read_body(request))
        text = payload.get("input")
        if not isinstance(text, str):
            raise InvalidRequestError("input must be a string", param="input")
        unknown = sorted(set(payload) - {"input", "model"})
        if unknown:
            raise InvalidRequestError(f"unknown field {unknown[0]}", param=unknown[0])
        verdict = await guards.classify(text, via=checks)
        return {"jailbreak": verdict.blocked, "score": verdict.score}

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request) -> JSONResponse:
        """Every ready model, as its engine describes it."""
        proxy.authorize(request)
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
        states = {
            m.id: {
                **m.supervisor.describe(),
                "running": m.admission.running,
                "waiting": m.admission.waiting,
            }
            for m in table
        }
        ok = (
            not proxy.draining
            and all(m.supervisor.state is State.READY for m in table)
            and guards.ready
        )
        status = "draining" if proxy.draining else "ready" if ok else "not_ready"
        body: dict[str, Any] = {"status": status, "models": states}
        if guards.config.configured:
            body["guardrails"] = guards.describe()
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
            "guardrails": guards.describe() if guards.config.configured else None,
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

    async def metrics_text(request: Request) -> Response:
        if settings.metrics_auth:
            proxy.authorize(request)
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
