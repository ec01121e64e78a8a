"""The front: one ASGI app serving `server.routes`' table.

Inference routes go through `proxy.Proxy` to the model's engine; the front's own routes
(`server.management`) answer from what it knows. `create_app` builds everything a request may
need once (model table, metrics, rails, the proxy and its engine clients, the Responses store),
and the lifespan starts every engine's supervisor and stops them all on shutdown, so no engine
outlives the front. With models on demand (`Settings.on_demand`) the lifespan opens a
`loading.ModelPool` instead, which starts the pinned models now and the others on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from inferd import __version__
from inferd.config import Settings
from inferd.errors import ConfigError
from inferd.guardrails.config import GuardrailsConfig
from inferd.guardrails.jailbreak import Training
from inferd.guardrails.rails import Guardrails
from inferd.observability.metrics import Metrics
from inferd.server import errors, routes, tuning, warmup
from inferd.server.adapters import Adapters
from inferd.server.admission import Admission, Lane, Limits
from inferd.server.apis.response_store import ResponseStore
from inferd.server.context import RequestIdMiddleware
from inferd.server.guard_models import ServiceGuardModels
from inferd.server.keys import KeyRing
from inferd.server.loading import FitCheck, ModelPool, Policy
from inferd.server.management import API_VERSION, PROMETHEUS_TEXT, Front
from inferd.server.proxy import Proxy
from inferd.server.served import ModelTable, ServedModel
from inferd.server.supervisor import State, Supervisor

__all__ = ["API_VERSION", "PROMETHEUS_TEXT", "create_app"]
log = logging.getLogger("inferd.guardrails")


def create_app(
    models: list[ServedModel],
    settings: Settings | None = None,
    keys: KeyRing | None = None,
    guards_config: GuardrailsConfig | None = None,
    jailbreak_training: Training | None = None,
    fits: FitCheck | None = None,
    adapters: Adapters | None = None,
) -> FastAPI:
    """The front for `models`. `keys`: when it holds active keys, inference routes need one.
    `guards_config`: the rails applied inline (and the defaults of /v1/guardrails/check);
    `jailbreak_training`: where the jailbreak rail's classifier is (or is trained into);
    `fits`: with models on demand, whether a set of models fits in memory together;
    `adapters`: the LoRA adapters served beside the models (`server.adapters`)."""
    settings = settings or Settings()
    table = ModelTable(models)
    metrics = Metrics()
    guards = Guardrails(
        guards_config or GuardrailsConfig(), metrics, served={m.id: m.entry.task for m in table}
    )
    if guards.jailbreak_model is not None and jailbreak_training is None:
        raise ValueError("the jailbreak rail needs jailbreak_training")
    for m in table:
        for b in m.backends:
            metrics.add_model(m.id, b.name)
        m.admission = _admission(m, settings, metrics)
    pool = _pool(table, settings, guards, metrics, fits)
    store = ResponseStore(
        max_entries=settings.responses_max_stored, max_bytes=settings.responses_max_bytes
    )
    proxy = Proxy(
        table,
        metrics,
        keys=keys,
        max_body_bytes=settings.max_body_bytes,
        log_requests=settings.log_requests,
        guards=guards if guards.active else None,
        translations={"store": store},
        engine_read_timeout_s=settings.engine_read_timeout_s,
        max_answer_bytes=settings.max_engine_answer_bytes,
        adapters=adapters,
    )
    # Output rails' calls skip admission (their request holds a slot, maybe of the very engine
    # it asks); input rails and the check routes wait for one like any request.
    guards.models = ServiceGuardModels(proxy, table, admit=False)
    guards.admitted = checks = ServiceGuardModels(proxy, table, admit=True)
    front = Front(settings, table, metrics, proxy, guards, checks, store, pool)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await proxy.open()
        assert proxy.session is not None
        # Starlette runs a streamed answer in an anyio task group, and anyio imports its asyncio
        # backend on the first: 7-10 ms of the first user's first token, paid here instead,
        # while the engines load.
        async with anyio.create_task_group():
            pass
        if pool is not None:
            pool.open()
        else:
            for m in table:
                if not m.supervisor.started:  # `inferd serve` starts them first (server.boot)
                    m.supervisor.start()
        # On demand, the pool starts a model's later engines with each load.
        joining = [asyncio.create_task(m.join()) for m in table if m.others and pool is None]
        training = None
        if jailbreak_training is not None and guards.jailbreak_model is not None:
            training = asyncio.create_task(_prepare_jailbreak(jailbreak_training))
        proxy.adapters.start()  # re-reads INFERD_LORA_PATH, when a refresh period is set
        # Measures quick-starting profiles not measured here yet, while no request is in.
        idle = lambda: all(m.admission.running + m.admission.waiting == 0 for m in table)  # noqa: E731
        tuner = tuning.background(table, settings, idle) if pool is None else None
        try:
            yield
        finally:
            await tuning.stop(tuner)
            for task in joining:
                task.cancel()
            await asyncio.gather(*joining, return_exceptions=True)
            await proxy.adapters.stop()
            if training is not None:
                training.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await training
            if pool is not None:
                await pool.shutdown()
            await asyncio.gather(*(b.supervisor.stop() for m in table for b in m.backends))
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
    app.state.front = front
    app.state.models = table
    app.state.metrics = metrics
    app.state.proxy = proxy
    app.state.guards = guards
    app.state.pool = pool
    errors.install(app, routes.api_of)
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

    routes.install(app, [m.id for m in table])
    return app


def _admission(m: ServedModel, settings: Settings, metrics: Metrics) -> Admission:
    """The model's slots and queue; a model with several engines gets a lane per engine (its
    capacity their sum) and its router's choice between them."""
    if not m.others:
        running = settings.max_running or m.profile.max_running
        queue = settings.max_queue if settings.max_queue is not None else 2 * running
        limits = Limits(running, queue, settings.queue_timeout_s)
        return Admission(m.id, limits, metrics.requests_running, metrics.requests_waiting)
    lanes = [
        Lane(
            b.name,
            settings.max_running or b.profile.max_running,
            usable=functools.partial(_usable, b.supervisor),
        )
        for b in m.backends
    ]
    running = sum(lane.max_running for lane in lanes)
    queue = settings.max_queue if settings.max_queue is not None else 2 * running
    limits = Limits(running, queue, settings.queue_timeout_s)
    router = m.router
    assert router is not None, "a model with several engines is served with its router"
    admission = Admission(
        m.id,
        limits,
        metrics.requests_running,
        metrics.requests_waiting,
        lanes=lanes,
        choose=router.choose,
        moments=router.moments,
        turn=lambda: router.turn_now,
        prompt_s=router.prompt_s,
        alone=router.alone,
    )
    for b in m.backends:  # a lane whose engine becomes ready takes waiters at once
        b.supervisor.on_ready.append(admission.wake)
    # The later engines' starts yield the cores while the first engine serves, and once ready
    # they rest while they have nothing to do (server.warmup).
    later = {lane: b.supervisor for lane, b in enumerate(m.others, start=1)}  # m.backends' order
    admission.watchers.append(warmup.Yield(admission, later))
    return admission


def _usable(supervisor: Supervisor) -> bool:
    return supervisor.state is State.READY


def _pool(
    table: ModelTable,
    settings: Settings,
    guards: Guardrails,
    metrics: Metrics,
    fits: FitCheck | None,
) -> ModelPool | None:
    """The pool of models on demand, when asked for. The models the rails call are pinned as
    well: a rail runs inside another request and must not wait for a load."""
    if not settings.on_demand:
        return None
    rails = {m for stage in guards.models_used().values() for m in stage.values()}
    pinned = frozenset(settings.pinned) | {m.id for m in table if m.id in rails}
    if settings.max_loaded is not None and len(pinned) > settings.max_loaded:
        raise ConfigError(
            f"{len(pinned)} models must stay loaded ({', '.join(sorted(pinned))}: keep_loaded "
            f"and the models the guardrails call), more than max_loaded {settings.max_loaded}"
        )
    policy = Policy(settings.max_loaded, settings.idle_unload_s, pinned, settings.load_timeout_s)
    pool = ModelPool(table, policy, metrics, fits)
    for m in table:
        m.pool = pool
    return pool
