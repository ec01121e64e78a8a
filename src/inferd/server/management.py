"""The routes the front answers itself: models, health, metadata, version, licence, metrics, the
guardrails' check routes and the Responses store.

Each handler reads what it needs from the app's state (`Front`, built once by `create_app`):
liveness as soon as HTTP is served, readiness from each engine's supervisor, metadata and licence
from the catalog entry and cache provenance, metrics from inferd's registry followed by each
engine's own. `server.routes` lists them beside the forwarded routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from inferd import __version__
from inferd.config import Settings
from inferd.errors import EngineNotReadyError, InvalidRequestError
from inferd.guardrails.rails import Guardrails
from inferd.guardrails.texts import guardrail_texts
from inferd.observability.metrics import Metrics
from inferd.server import retrieval
from inferd.server.apis import conform, messages_request
from inferd.server.apis import messages as messages_api
from inferd.server.apis import responses as responses_api
from inferd.server.apis.response_store import ResponseStore
from inferd.server.guard_models import ServiceGuardModels
from inferd.server.proxy import Proxy, parse_body
from inferd.server.served import ModelTable, ServedModel
from inferd.server.supervisor import State

API_VERSION = "1.0.0"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Front:
    """What the front's own routes read: built once by `create_app`, shared, never per request."""

    settings: Settings
    models: ModelTable
    metrics: Metrics
    proxy: Proxy
    guards: Guardrails
    checks: ServiceGuardModels  # the check routes' way to the guard models (admitted)
    responses: ResponseStore


def front(request: Request) -> Front:
    state: Front = request.app.state.front
    return state


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


# ---------------------------------------------------------------------- models


async def _engine_model(f: Front, m: ServedModel) -> dict[str, Any] | None:
    """The model as its engine lists it (its `max_model_len` and ownership), in OpenAI's
    `Model` shape; None while its engine is not ready."""
    if m.supervisor.state is not State.READY or f.proxy.session is None:
        return None
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        async with f.proxy.session.get(
            m.supervisor.base_url + "/v1/models", headers=m.supervisor.auth_headers()
        ) as resp:
            if resp.status == 200:
                for item in (await resp.json()).get("data", []):
                    if isinstance(item, dict) and item.get("id") == m.id:
                        return _openai_model(item, m)
    return None


def _openai_model(item: dict[str, Any], m: ServedModel) -> dict[str, Any]:
    """OpenAI's `Model` (id, object, created, owned_by) and what vLLM adds (`max_model_len`,
    which NIM's clients read), nothing private to an engine (llama-server's `meta`)."""
    model = conform.model(item)
    model = {**model, "id": m.id, "object": "model"}
    model.setdefault("max_model_len", m.supervisor.engine.context)
    return model


async def list_models(request: Request) -> JSONResponse:
    """Every ready model, as its engine describes it."""
    f = front(request)
    f.proxy.authorize(request)
    found = await asyncio.gather(*(_engine_model(f, m) for m in f.models))
    data = [m for m in found if m is not None]
    if not data:
        raise EngineNotReadyError("no model is ready yet; retry shortly")
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> JSONResponse:
    """One model, as OpenAI's `models.retrieve` reads it."""
    f = front(request)
    f.proxy.authorize(request)
    model_id = request.path_params["model"]
    served = f.models.lookup(model_id)  # 404 model_not_found for a model not served here
    found = await _engine_model(f, served)
    if found is None:
        raise EngineNotReadyError(f"model {model_id} is not ready yet; retry shortly")
    return JSONResponse(found)


# ---------------------------------------------------------------------- health and metadata


async def live(request: Request) -> dict[str, str]:
    return {"status": "live"}


async def ready(request: Request) -> JSONResponse:
    f = front(request)
    states = {
        m.id: {
            **m.supervisor.describe(),
            "running": m.admission.running,
            "waiting": m.admission.waiting,
        }
        for m in f.models
    }
    ok = (
        not f.proxy.draining
        and all(m.supervisor.state is State.READY for m in f.models)
        and f.guards.ready
    )
    status = "draining" if f.proxy.draining else "ready" if ok else "not_ready"
    body: dict[str, Any] = {"status": status, "models": states}
    if f.guards.config.configured:
        body["guardrails"] = f.guards.describe()
    return JSONResponse(body, 200 if ok else 503, None if ok else {"Retry-After": "5"})


async def metadata(request: Request) -> dict[str, Any]:
    f = front(request)
    infos = [_model_info(m) for m in f.models]
    return {
        "inferd_version": __version__,
        "models": infos,
        # NIM's field names, so NIM tooling finds the selected profile where it looks.
        "selectedModelProfileId": infos[0]["profile"]["id"] if infos else None,
        "modelInfo": [{"shortName": i["id"], "modelUrl": None} for i in infos],
        "guardrails": f.guards.describe() if f.guards.config.configured else None,
    }


async def version(request: Request) -> dict[str, str]:
    return {"release": __version__, "api": API_VERSION}


async def license_(request: Request) -> dict[str, Any]:
    return {
        "licenses": [
            {
                "model": m.id,
                "license": m.entry.license,
                "url": m.entry.license_url or None,
                "content": m.license_text,
            }
            for m in front(request).models
        ]
    }


async def metrics_text(request: Request) -> Response:
    f = front(request)
    if f.settings.metrics_auth:
        f.proxy.authorize(request)
    for m in f.models:
        sup = m.supervisor
        f.metrics.engine_ready.labels(m.id, sup.engine.name).set(sup.state is State.READY)
        f.metrics.engine_restarts.labels(m.id, sup.engine.name).set(sup.restarts)
    parts = [f.metrics.render()]
    assert f.proxy.session is not None
    for m in f.models:
        sup = m.supervisor
        if sup.state is not State.READY:
            continue
        # Engine metrics pass through unchanged; a slow engine costs the scrape 2 s at most.
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with f.proxy.session.get(
                sup.base_url + sup.engine.metrics_path,
                headers=sup.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=2),
            ) as resp:
                if resp.status == 200:
                    parts.append(await resp.read())
    return Response(b"".join(parts), media_type=PROMETHEUS_TEXT)


# ---------------------------------------------------------------------- guardrails


async def guardrails_check(request: Request) -> dict[str, Any]:
    """Each named rail over `text` (or the messages' text): one verdict per rail."""
    f = front(request)
    f.proxy.authorize(request)
    payload = parse_body(await f.proxy.read_body(request))
    texts = guardrail_texts(payload)
    rails = payload.get("rails")
    if not isinstance(rails, list) or not all(isinstance(r, str) for r in rails):
        raise InvalidRequestError("rails must be a list of rail names", param="rails")
    unknown = sorted(set(payload) - {"text", "messages", "rails"})
    if unknown:
        raise InvalidRequestError(f"unknown field {unknown[0]}", param=unknown[0])
    verdicts = await f.guards.check(texts, rails, via=f.checks)
    return {
        "blocked": any(v.blocked for v in verdicts),
        "rails": [v.as_dict() for v in verdicts],
    }


async def classify(request: Request) -> dict[str, Any]:
    """NemoGuard JailbreakDetect: `{input}` -> `{jailbreak, score}`."""
    f = front(request)
    f.proxy.authorize(request)
    payload = parse_body(await f.proxy.read_body(request))
    text = payload.get("input")
    if not isinstance(text, str):
        raise InvalidRequestError("input must be a string", param="input")
    unknown = sorted(set(payload) - {"input", "model"})
    if unknown:
        raise InvalidRequestError(f"unknown field {unknown[0]}", param=unknown[0])
    verdict = await f.guards.classify(text, via=f.checks)
    return {"jailbreak": verdict.blocked, "score": verdict.score}


# ---------------------------------------------------------------------- Anthropic's token count


async def count_tokens(request: Request) -> JSONResponse:
    """Anthropic's `/v1/messages/count_tokens`: the prompt's tokens as the model's template
    renders it, counted by the engine's own tokenizer."""
    f = front(request)
    f.proxy.authorize(request)
    payload = parse_body(await f.proxy.read_body(request))
    served = f.models.lookup(payload.get("model"))
    query = messages_request.count_tokens_request(payload)
    served.require_ready()
    slot = await served.admission.acquire()  # it runs on the engine like any request
    try:
        count = await f.proxy.client(served.id).count_chat(query)
    finally:
        slot.release()
    return JSONResponse(messages_api.count_tokens_answer(count))


# ---------------------------------------------------------------------- stored responses


def _stored(request: Request) -> tuple[Front, str]:
    f = front(request)
    f.proxy.authorize(request)
    return f, request.path_params["response_id"]


async def get_response(request: Request) -> JSONResponse:
    """A stored Response (`store: true`), as `responses.retrieve` reads it."""
    f, rid = _stored(request)
    return JSONResponse(responses_api.retrieve(f.responses, rid))


async def delete_response(request: Request) -> JSONResponse:
    f, rid = _stored(request)
    return JSONResponse(responses_api.delete(f.responses, rid))
