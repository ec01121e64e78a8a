"""Models on demand: which engines run, started on a model's first request, stopped when idle or
to make room for another.

One `ModelPool` per app when an on-demand setting is given (`Settings.on_demand`); without one,
every engine starts with the app and runs until shutdown, as before. A request takes a `Lease` on
its model (`ModelPool.use`, called by `ServedModel.acquire` before the admission slot): that starts
the engine if it is not running and waits for it, at most `load_timeout_s` (then 503 with
Retry-After; the load goes on for the next request), and keeps the model loaded until the answer
has been fully relayed. A load that finds no room (`max_loaded` models loaded, or the memory
estimate saying the next one does not fit beside them) stops the least recently used model that no
request holds and nobody pinned; if every loaded model is in use it waits until one is free: a
request is never cut to make room. A model no request has held for `idle_unload_s` is stopped.
Pinned models (`keep_loaded`, and those the guardrails call) load at start and stay.
A model with a combined profile is loaded once its first engine answers; its later engines start
behind it as they do at the service's start (`ServedModel.join`), and an unload stops them all.

Neighbours: `supervisor.Supervisor` starts and stops the engine process (its whole process
group); `served.ServedModel` holds the pool and takes the lease; `management` shows each model's
state in `/v1/models` and readiness; `runtime` closes the pool when the drain begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inferd.errors import DrainingError, EngineNotReadyError, EngineStartError
from inferd.observability.metrics import Metrics
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor

log = logging.getLogger("inferd.loading")

# Why a set of models does not fit in memory together, or None when it does (from the memory
# estimates: `cli.plan.check_fit_together`).
FitCheck = Callable[[list[str]], str | None]

# Retry-After (s) when how long a load takes is not known yet (its first load) or it is overdue.
RETRY_AFTER_S = 5


class LoadState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"  # its engine is being stopped; a request waits, then loads it again


@dataclass(frozen=True)
class Policy:
    max_loaded: int | None  # None: no limit by count (memory still applies)
    idle_unload_s: float | None  # None: never unloaded for idleness
    pinned: frozenset[str]
    load_timeout_s: float


class Resident:
    """One model's place in the pool: its load state, the requests holding it, its last use."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.state = LoadState.UNLOADED
        self.users = 0  # requests holding or waiting for it: it is never stopped under them
        self.last_used = 0.0
        self.failures = 0  # loads that failed so far; a waiter gives up when it grows
        self.error: str | None = None  # why the last load failed
        self.load_seconds: float | None = None  # how long the last load took
        self.load_began: float | None = None  # when the load under way began (monotonic)
        self.task: asyncio.Task[None] | None = None  # the load under way
        self.joining: asyncio.Task[None] | None = None  # a combined profile's later engines
        self.engine_started = False  # its engine is running or starting (takes room)

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def takes_room(self) -> bool:
        # A load still waiting for room takes none: counting it would have two waiting loads
        # each wait for the other.
        return self.state is not LoadState.UNLOADED and self.engine_started


class Lease:
    """A request's hold on a loaded model; `release()` is idempotent."""

    def __init__(self, pool: ModelPool, resident: Resident) -> None:
        self._pool = pool
        self._resident = resident
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool._let_go(self._resident)


class ModelPool:
    """Which models' engines run: loads on request, room by LRU and memory, idle unloads."""

    def __init__(
        self,
        models: Iterable[ServedModel],
        policy: Policy,
        metrics: Metrics,
        fits: FitCheck | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.fits = fits
        self._residents = {m.id: Resident(m) for m in models}
        for model in self._residents:  # every series at zero before the first load
            metrics.model_loads.labels(model)
            metrics.model_load_failures.labels(model)
            metrics.model_loaded.labels(model).set(0)
        # Decisions about room (which to stop, whether the next fits) are taken one at a time,
        # so two loads never both count the same free place.
        self._room = asyncio.Lock()
        self._change = asyncio.Event()  # set (and replaced) whenever any state changes
        self._closed: str | None = None  # the drain: why nothing new is loaded
        self._idle_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ views

    def state(self, model: str) -> LoadState:
        return self._residents[model].state

    def pinned(self, model: str) -> bool:
        return model in self.policy.pinned

    def describe(self, model: str) -> dict[str, object]:
        r = self._residents[model]
        return {
            "load_state": r.state.value,
            "pinned": self.pinned(model),
            "in_use": r.users,
            "last_load_error": r.error,
        }

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Start the pinned models' engines and the idle watch."""
        for r in self._residents.values():
            if self.pinned(r.id):
                self._start_load(r)
        if self.policy.idle_unload_s is not None:
            self._idle_task = asyncio.create_task(self._watch_idle(), name="idle unload")

    def close(self, reason: str) -> None:
        """The drain: waiters for a load get 503 `shutting_down` now; nothing new loads."""
        self._closed = reason
        self._changed()

    async def shutdown(self) -> None:
        """Stop the idle watch and the loads under way (their engines stop with the app)."""
        self._closed = self._closed or "the service is shutting down"
        tasks = [t for r in self._residents.values() for t in (r.task, r.joining) if t]
        if self._idle_task is not None:
            tasks.append(self._idle_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ requests

    async def use(self, model: ServedModel) -> Lease:
        """Hold `model` loaded for one request: start it if it is not running, wait for it (at
        most `load_timeout_s`), or 503 with Retry-After."""
        r = self._residents[model.id]
        r.users += 1  # before any wait: from now on nobody stops it under this request
        try:
            if r.state is not LoadState.LOADED:
                await asyncio.wait_for(self._until_loaded(r), self.policy.load_timeout_s)
        except TimeoutError:
            self._let_go(r)
            raise EngineNotReadyError(
                f"model {r.id} is still loading after {self.policy.load_timeout_s:g} s "
                f"({r.state.value}); retry shortly",
                retry_after_s=self._retry_after(r),
            ) from None
        except BaseException:
            self._let_go(r)
            raise
        r.last_used = time.monotonic()
        return Lease(self, r)

    async def _until_loaded(self, r: Resident) -> None:
        failures = r.failures
        while True:
            if self._closed is not None:
                raise DrainingError(self._closed)
            if r.failures > failures:
                raise EngineNotReadyError(
                    f"model {r.id} could not be loaded: {r.error}; retry later",
                    retry_after_s=self._retry_after(r),
                )
            if r.state is LoadState.LOADED:
                return
            if r.state is LoadState.UNLOADED:
                self._start_load(r)
            await self._changed_event().wait()  # loading, or stopping before it loads again

    def _let_go(self, r: Resident) -> None:
        r.users -= 1
        r.last_used = time.monotonic()
        self._changed()

    def _retry_after(self, r: Resident) -> int:
        # What is left of the load under way, by the last load's time: a request refused after
        # waiting `load_timeout_s` for a vLLM that loads in 220 s is told the ~100 s left, not
        # 220 s more. Unknown (a first load) or already overdue: a short wait, then ask again.
        if not r.load_seconds:
            return RETRY_AFTER_S
        left = r.load_seconds
        if r.state is LoadState.LOADING and r.load_began is not None:
            left -= time.monotonic() - r.load_began
        return math.ceil(left) if left >= 1 else RETRY_AFTER_S

    # ------------------------------------------------------------------ loading

    def _start_load(self, r: Resident) -> None:
        r.state = LoadState.LOADING
        # A context of its own: the engine's log lines must not carry the id of the request
        # that happened to start it (`context.RequestIdMiddleware` keeps it in a contextvar).
        r.task = asyncio.create_task(
            self._load(r), name=f"load {r.id}", context=contextvars.Context()
        )
        self._changed()

    async def _load(self, r: Resident) -> None:
        r.load_began = begun = time.monotonic()
        sup = r.model.supervisor
        try:
            async with self._room:
                if not await self._make_room(r):
                    r.state = LoadState.UNLOADED  # nobody waits for it any more
                    return
                log.info("loading %s", r.id)
                r.engine_started = True
                sup.start()
            ready = await _ready_or_failed(sup)
        except asyncio.CancelledError:
            r.state, r.engine_started = LoadState.UNLOADED, False  # shutdown: the app stops it
            raise
        except EngineStartError as exc:  # no room, even with every unpinned model stopped
            sup.last_error = str(exc)
            ready = False
        except Exception as exc:  # never leave a waiter hanging on a load that died
            log.exception("loading %s failed", r.id)
            sup.last_error = f"{type(exc).__name__}: {exc}"
            ready = False
        finally:
            self._changed()
        if ready:
            if r.model.others:  # its later engines start behind the first, as at a service start
                r.joining = asyncio.create_task(
                    r.model.join(), name=f"join {r.id}", context=contextvars.Context()
                )
            r.load_seconds = time.monotonic() - begun
            r.state, r.last_used, r.error = LoadState.LOADED, time.monotonic(), None
            self.metrics.model_loads.labels(r.id).inc()
            self.metrics.model_load_seconds.labels(r.id).observe(r.load_seconds)
            self.metrics.model_loaded.labels(r.id).set(1)
            log.info("%s loaded in %.1f s", r.id, r.load_seconds)
        else:
            r.error = sup.last_error or "the engine failed to start"
            log.error("%s could not be loaded: %s", r.id, r.error)
            await self._stop_engines(r)  # the failed engine's process group, cleared
            r.failures += 1
            r.state, r.engine_started = LoadState.UNLOADED, False
            self.metrics.model_load_failures.labels(r.id).inc()
        self._changed()

    async def _make_room(self, r: Resident) -> bool:
        """Stop idle models (least recently used first) until `r` fits; wait while every model
        in the way is in use. False: nobody wants `r` any more (its waiters timed out)."""
        while True:
            if self._closed is not None:
                return False
            in_memory = [x for x in self._residents.values() if x is not r and x.takes_room]
            why = self._no_room(in_memory, r)
            if why is None:
                return True
            pinned = [x for x in in_memory if self.pinned(x.id)]
            if self._no_room(pinned, r) is not None:
                # Not even with every unpinned model stopped: waiting would not help.
                raise EngineStartError(f"it does not fit beside the pinned models: {why}")
            if r.users == 0 and not self.pinned(r.id):
                return False
            victim = min(
                (x for x in in_memory if self._evictable(x)),
                key=lambda x: x.last_used,
                default=None,
            )
            if victim is None:
                await self._changed_event().wait()  # a request ends, a load fails...
                continue
            log.info("stopping %s to load %s: %s", victim.id, r.id, why)
            await self._unload(victim, "evicted")

    def _no_room(self, in_memory: list[Resident], r: Resident) -> str | None:
        limit = self.policy.max_loaded
        if limit is not None and len(in_memory) >= limit:
            return f"{len(in_memory)} model(s) loaded, max_loaded is {limit}"
        if self.fits is not None:
            return self.fits([x.id for x in in_memory] + [r.id])
        return None

    def _evictable(self, r: Resident) -> bool:
        return r.state is LoadState.LOADED and r.users == 0 and not self.pinned(r.id)

    async def _unload(self, r: Resident, reason: str) -> None:
        # Called with the room lock held, right after `_evictable` said yes: no await between
        # the check and the state change, so no request can take the model in between.
        r.state = LoadState.UNLOADING
        self._changed()
        try:
            await self._stop_engines(r)
        finally:
            r.state, r.engine_started = LoadState.UNLOADED, False
            self.metrics.model_unloads.labels(r.id, reason).inc()
            self.metrics.model_loaded.labels(r.id).set(0)
            self._changed()
        log.info("%s unloaded (%s)", r.id, reason)

    @staticmethod
    async def _stop_engines(r: Resident) -> None:
        """Stop every engine of `r`'s model (with a combined profile, the later ones too, and
        their start if it has not happened yet)."""
        joining, r.joining = r.joining, None
        if joining is not None:
            joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await joining
        await asyncio.gather(*(b.supervisor.stop() for b in r.model.backends))

    async def _watch_idle(self) -> None:
        idle = self.policy.idle_unload_s
        assert idle is not None
        every = min(max(idle / 4, 0.1), 5.0)
        while True:
            await asyncio.sleep(every)
            for r in self._residents.values():
                if self._idle_for(r, idle):
                    async with self._room:
                        if self._idle_for(r, idle):  # still, now that it is our turn
                            await self._unload(r, "idle")

    def _idle_for(self, r: Resident, idle_s: float) -> bool:
        return self._evictable(r) and time.monotonic() - r.last_used >= idle_s

    # ------------------------------------------------------------------ change notification

    def _changed(self) -> None:
        """Wake everyone waiting for a change (loads waiting for room, requests for loads)."""
        self._change.set()
        self._change = asyncio.Event()

    def _changed_event(self) -> asyncio.Event:
        return self._change


async def _ready_or_failed(sup: Supervisor) -> bool:
    """Whether the engine became ready (True) or its supervisor gave up (False)."""
    ready = asyncio.ensure_future(sup.ready.wait())
    failed = asyncio.ensure_future(sup.failed.wait())
    try:
        await asyncio.wait({ready, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (ready, failed):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return sup.ready.is_set()
