"""The routes the front answers itself: models, health, metadata, version, licence, metrics, the
guardrails' check routes and the Responses store.

Each handler reads what it needs from the app's state (`Front`, built once by `create_app`):
liveness as soon as HTTP is served, readiness from each engine's supervisor, metadata and licence
from the catalog entry and cache provenance, metrics from inferd's registry followed by each
engine's own. `server.routes` lists them beside the forwarded routes. With models on demand
(`server.loading`), `/v1/models` lists every model with its load state and readiness means the
service can take requests (its pinned models ready), not that every model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from inferd import __version__
from inferd.config import Settings
from inferd.errors import EngineNotReadyError, InvalidRequestError
from inferd.guardrails.rails import Guardrails
from inferd.guardrails.texts import guardrail_texts
from inferd.observability import gateway_metrics
from inferd.observability.metrics import Metrics
from inferd.server import retrieval
from inferd.server.apis import conform, messages_request
from inferd.server.apis import messages as messages_api
from inferd.server.apis import responses as responses_api
from inferd.server.apis.response_store import ResponseStore
from inferd.server.guard_models import ServiceGuardModels
from inferd.server.loading import ModelPool
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
    pool: ModelPool | None = None  # models on demand; None: every engine runs from the start
    # `created` of a model object whose engine is not running to say its own.
    started: int = field(default_factory=lambda: int(time.time()))


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
            "id": m.profile_id,
            "tags": m.profile.tags,
            "description": m.profile.description,
        },
        "engine": {
            "name": sup.engine.name,
            "version": sup.engine_version,
            "state": sup.state.value,
        },
        **({"engines": _engines(m)} if m.others else {}),
        "source": m.provenance.get("source"),
        **retrieval.describe(m.entry),
    }


def _engines(m: ServedModel) -> list[dict[str, Any]]:
    """A combined profile's engines: each one's profile, state and share of the requests."""
    lanes = m.admission.lanes
    total = sum(lane.taken for lane in lanes) or 1
    return [
        {
            "name": b.name,
            "profile": b.profile.id,
            "version": b.supervisor.engine_version,
            "state": b.supervisor.state.value,
            "running": lane.running,
            "max_running": lane.max_running,
            "requests": lane.taken,
            "share": round(lane.taken / total, 3),
            "recalled": lane.recalled,
        }
        for b, lane in zip(m.backends, lanes, strict=True)
    ]


def _with_state(f: Front, m: ServedModel, info: dict[str, Any]) -> dict[str, Any]:
    """With models on demand, the model's load state (`loaded`, `loading`, `unloaded`,
    `unloading`): a field beside OpenAI's (its `Model` schema allows more)."""
    return info if f.pool is None else {**info, "state": f.pool.state(m.id).value}


# ---------------------------------------------------------------------- models


async def _engine_model(f: Front, m: ServedModel) -> dict[str, Any] | None:
    """The model as its engine lists it (its `max_model_len` and ownership), in OpenAI's
    `Model` shape; None while no engine of it is ready (the first ready one answers)."""
    sup = next((b.supervisor for b in m.backends if b.supervisor.state is State.READY), None)
    if sup is None:
        return None
    answer = await sup.fetch("/v1/models", limit_s=5)
    if answer is not None and answer[0] == 200:
        with contextlib.suppress(ValueError, AttributeError):
            for item in json.loads(answer[1]).get("data", []):
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


def _unloaded_model(f: Front, m: ServedModel) -> dict[str, Any]:
    """A model on demand whose engine is not running, in the same shape (what the engine would
    say, where the front knows it)."""
    return {
        "id": m.id,
        "object": "model",
        "created": f.started,
        "owned_by": "inferd",
        "max_model_len": m.supervisor.engine.context,
    }


async def _listed(f: Front, m: ServedModel) -> dict[str, Any] | None:
    found = await _engine_model(f, m)
    if found is None and f.pool is not None:
        found = _unloaded_model(f, m)  # on demand, every model is listed, loaded or not
    return None if found is None else _with_state(f, m, found)


def _adapter_state(f: Front, adapter: dict[str, Any]) -> dict[str, Any]:
    """On demand, an adapter is as loaded as its base model (it starts with it)."""
    return (
        adapter if f.pool is None else {**adapter, "state": f.pool.state(adapter["parent"]).value}
    )


async def list_models(request: Request) -> JSONResponse:
    """Every ready model, as its engine describes it; on demand, every model served."""
    f = front(request)
    f.proxy.authorize(request)
    found = await asyncio.gather(*(_listed(f, m) for m in f.models))
    data = [m for m in found if m is not None]
    if data:  # adapters, each with its base model as `parent` (server.adapters)
        data += [_adapter_state(f, a) for a in f.proxy.adapters.models_listed()]
    if not data:
        raise EngineNotReadyError("no model is ready yet; retry shortly")
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> JSONResponse:
    """One model, as OpenAI's `models.retrieve` reads it."""
    f = front(request)
    f.proxy.authorize(request)
    model_id = request.path_params["model"]
    for adapter in f.proxy.adapters.models_listed():
        if adapter["id"] == model_id:
            return JSONResponse(_adapter_state(f, adapter))
    served = f.models.lookup(model_id)  # 404 model_not_found for a model not served here
    found = await _listed(f, served)
    if found is None:
        raise EngineNotReadyError(f"model {model_id} is not ready yet; retry shortly")
    return JSONResponse(found)


# ---------------------------------------------------------------------- health and metadata


async def live(request: Request) -> dict[str, str]:
    return {"status": "live"}


async def ready(request: Request) -> JSONResponse:
    """200 when the service can take requests: every engine ready, or on demand every pinned
    one (the others load on their first request)."""
    f = front(request)
    states = {
        m.id: {
            **m.supervisor.describe(),
            "running": m.admission.running,
            "waiting": m.admission.waiting,
            **(f.pool.describe(m.id) if f.pool is not None else {}),
            # Several engines: each one's state; the model is ready when one of them is.
            **({"engines": [b.supervisor.describe() for b in m.backends]} if m.others else {}),
        }
        for m in f.models
    }
    needed = [m for m in f.models if not m.on_demand]
    ok = not f.proxy.draining and all(m.ready for m in needed) and f.guards.ready
    status = "draining" if f.proxy.draining else "ready" if ok else "not_ready"
    body: dict[str, Any] = {"status": status, "models": states}
    if f.guards.config.configured:
        body["guardrails"] = f.guards.describe()
    return JSONResponse(body, 200 if ok else 503, None if ok else {"Retry-After": "5"})


async def metadata(request: Request) -> dict[str, Any]:
    f = front(request)
    infos = [_with_state(f, m, _model_info(m)) for m in f.models]
    return {
        "inferd_version": __version__,
        "models": infos,
        # NIM's field names, so NIM tooling finds the selected profile where it looks.
        "selectedModelProfileId": infos[0]["profile"]["id"] if infos else None,
        "modelInfo": [{"shortName": i["id"], "modelUrl": None} for i in infos],
        "guardrails": f.guards.describe() if f.guards.config.configured else None,
        "adapters": f.proxy.adapters.describe(),
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
        for b in m.backends:
            sup = b.supervisor
            f.metrics.engine_ready.labels(m.id, b.name).set(sup.state is State.READY)
            f.metrics.engine_restarts.labels(m.id, b.name).set(sup.restarts)
    parts = [f.metrics.render()]
    ready = [
        (m, b.supervisor) for m in f.models for b in m.backends if b.supervisor.state is State.READY
    ]
    # Engine metrics pass through, less the inference gateway's families, which are written
    # again with inferd's queue added (`gateway_metrics`); a slow engine costs 2 s at most.
    scraped = await asyncio.gather(
        *(
            gateway_metrics.scrape(
                functools.partial(sup.fetch, limit_s=2), sup.engine.name, sup.engine.metrics_path
            )
            for _, sup in ready
        )
    )
    by_model: dict[str, list[gateway_metrics.EngineLoad]] = {}
    for (m, _), (body, load) in zip(ready, scraped, strict=True):
        parts.append(body)
        if load is not None:
            by_model.setdefault(m.id, []).append(load)
    loads = []
    for m in f.models:
        if m.id in by_model:
            engine = m.supervisor.engine  # its LoRA adapters, all loaded at its start
            adapters = tuple(a.name for a in engine.adapters)
            limit = engine.lora.max_loras if engine.lora else 0
            load = gateway_metrics.together(by_model[m.id])
            loads.append(
                gateway_metrics.ModelLoad(m.id, m.admission.waiting, load, adapters, (), limit)
            )
    parts.append(gateway_metrics.render(loads))
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
    adapter = f.proxy.adapters.find(payload.get("model"))  # same tokenizer as its base
    served = adapter.base if adapter else f.models.lookup(payload.get("model"))
    query = messages_request.count_tokens_request(payload)
    served.require_ready()
    slot = await served.acquire()  # it runs on the engine like any request
    try:
        count = await f.proxy.client(served.id, slot.lane).count_chat(query)
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
