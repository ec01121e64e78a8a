"""Measuring profiles on this machine: an engine started for `bench.tune`, and background tuning.

`started` runs one profile's engine under inferd's own `Supervisor` (the command, socket, key
and readiness check `serve` uses) for as long as the benchmark needs it; `inferd tune`
(`cli.tune_cmd`) and the background tuner both measure through it.

`background` is what `serve` runs once its models are ready (`Settings.tune_in_background`):
for each served model, the profiles that start in seconds (`STARTS_IN_SECONDS`: llama.cpp),
are runnable here, load the same source files as the profile served (so at most a conversion
in the cache, never a download), fit in memory beside the served engine, and have no
measurement for this machine's fingerprint yet, are measured with `bench.tune` and stored
(`catalog.measured`), so the next `serve`, `profiles` and `--dry-run` rank by them; those that
come close for one user (with the ones measured before) are then measured again in turns
(`bench.tune.in_turns`), as `inferd tune` does. It works only while no request is being served
(`idle`): every step waits for `QUIET_S` without one, and a step during which a request arrives
is cancelled at once, thrown away and run again later, so a user pays at most one poll interval
of shared CPU (an engine's start, two seconds, waits for quiet too but is not interrupted). The
engine measured stays up while requests hold a step back. Failures are logged and skipped:
tuning is a nicety, never a reason for the service to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from inferd import engines
from inferd.bench import tune
from inferd.cache import ModelStore
from inferd.cache.prepare import prepare
from inferd.catalog import hardware, measured, profiles
from inferd.catalog.hardware import Hardware
from inferd.catalog.schema import ModelEntry, Profile
from inferd.config import Settings
from inferd.engines import Engine, engine_for
from inferd.errors import EngineStartError
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor

log = logging.getLogger("inferd.tuning")

# Engines ready in a couple of seconds (llama.cpp: 1.7 s measured); vLLM's start (a minute
# and more, torch.compile) is `inferd tune`'s to spend, not a serving machine's.
STARTS_IN_SECONDS = frozenset({"llamacpp"})
QUIET_S = 2.0  # no request for this long before each step
POLL_S = 0.05  # how often a running step looks for a request
TUNE_READY_TIMEOUT_S = 120.0


@contextlib.asynccontextmanager
async def started(engine: Engine, ready_timeout_s: float) -> AsyncIterator[tune.Started]:
    """`engine` started afresh and ready; stopped (its whole process group) on exit."""
    supervisor = Supervisor(engine, ready_timeout_s=ready_timeout_s, backoff_s=(1.0,))
    supervisor.start()
    try:
        ready = asyncio.ensure_future(supervisor.ready.wait())
        failed = asyncio.ensure_future(supervisor.failed.wait())
        await asyncio.wait({ready, failed}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (ready, failed):
            waiter.cancel()
        if not supervisor.ready.is_set() or supervisor.socket is None:
            tail = " | ".join(list(supervisor.tail)[-3:])
            raise EngineStartError(
                f"the {engine.name} engine for {engine.profile.id} did not start: "
                f"{supervisor.last_error}" + (f" ({tail})" if tail else "")
            )
        endpoint = tune.Endpoint(supervisor.socket, supervisor.auth_headers(), engine.served_name)
        yield tune.Started(endpoint, supervisor.ready_seconds or 0.0)
    finally:
        await supervisor.stop()


def starter(
    engine: Engine, ready_timeout_s: float
) -> Callable[[], AbstractAsyncContextManager[tune.Started]]:
    """How `bench.tune` starts `engine` (afresh each time it is called)."""
    return lambda: started(engine, ready_timeout_s)


async def in_turns(
    engines: Mapping[str, Engine],
    figures: Mapping[str, measured.Measurement],
    ready_timeout_s: float,
    *,
    gate: tune.Gate = tune.at_once,
    advance: Callable[[str], object] = lambda profile: None,
) -> dict[str, measured.Measurement]:
    """`bench.tune.in_turns` on these engines (each started afresh per turn, its `tune.turn`
    plan): the profiles' `figures` merged with what the turns found."""

    return await tune.in_turns(
        {pid: starter(engine, ready_timeout_s) for pid, engine in engines.items()},
        {pid: figures[pid] for pid in engines},
        {pid: tune.turn(e.profile.max_running, e.context) for pid, e in engines.items()},
        gate=gate,
        advance=advance,
    )


def engine_of(entry: ModelEntry, profile: Profile, store: ModelStore, folder: Path) -> Engine:
    """The engine of `profile` as the catalog defines it (no --engine-args, its own limits)."""
    return engine_for(profile)(
        entry.id, folder, profile, [], store.engine_dir(profile.engine), profile.context
    )


class Tuner:
    """Background tuning of the served models (see the module's docstring)."""

    def __init__(
        self, models: Iterable[ServedModel], settings: Settings, idle: Callable[[], bool]
    ) -> None:
        self.models = list(models)
        self.settings = settings
        self.idle = idle
        self.store = ModelStore(settings.cache_path)
        self.thrown_away = 0  # steps a request interrupted (and that were run again)

    async def _quiet(self) -> None:
        """Until no request has been served for QUIET_S."""
        since = asyncio.get_running_loop().time()
        while True:
            now = asyncio.get_running_loop().time()
            if not self.idle():
                since = now
            elif now - since >= QUIET_S:
                return
            await asyncio.sleep(min(0.25, QUIET_S))

    async def gate(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """Run a step while no request is served; a step a request interrupts is cancelled
        and run again once the service is quiet."""
        while True:
            await self._quiet()
            task = asyncio.ensure_future(run())
            try:
                while not task.done() and self.idle():
                    await asyncio.wait({task}, timeout=POLL_S)
                if task.done() and self.idle():
                    return task.result()
            finally:  # thrown away, or the tuner itself cancelled (shutdown): the step ends
                if not task.done():
                    task.cancel()
                    # Not `await task`: a cancel of the tuner itself must propagate.
                    await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # retrieved, whatever the step did
            self.thrown_away += 1
            log.debug("a request arrived during a tuning step; it will be run again")

    def wanted(
        self, served: ServedModel, hw: Hardware, fp: measured.Fingerprint, *, again: bool = False
    ) -> list[Profile]:
        """The served model's profiles to measure in the background (see the docstring);
        `again`: those of them measured already instead (contenders for the turns)."""
        known = measured.load(self.store, fp, served.id)
        missing = engines.unavailable(tuple(g.compute_capability for g in hw.gpus))
        found = profiles.candidates(served.entry, hw, None, missing)
        mine = next((c for c in found if c.profile.id == served.profile.id), None)
        beside = mine.estimate.total if mine is not None and mine.estimate else 0
        picked = []
        for c in found:
            p, est = c.profile, c.estimate
            if not c.runnable or p.engine not in STARTS_IN_SECONDS or (p.id in known) != again:
                continue
            if p.source != served.profile.source:
                continue  # would download other files
            if est is not None and est.total + beside > est.available:
                continue  # would not fit beside the served engine
            picked.append(p)
        return picked

    async def _engine(self, entry: ModelEntry, profile: Profile) -> Engine:
        prepared = await asyncio.to_thread(
            prepare,
            entry,
            profile,
            self.store,
            index_url=self.settings.pypi_index_url,
            offline=True,  # same source as the served profile: its files are here
        )
        engine = engine_of(entry, profile, self.store, prepared.path)
        engine.cache_dir.mkdir(parents=True, exist_ok=True)
        return engine

    async def _measure(
        self, entry: ModelEntry, engine: Engine, fp: measured.Fingerprint
    ) -> measured.Measurement:
        profile = engine.profile
        await self._quiet()  # no engine starts while requests run
        return await tune.tune(
            starter(engine, TUNE_READY_TIMEOUT_S),
            model=entry.id,
            profile=profile.id,
            engine=profile.engine,
            fingerprint=fp.id,
            plan=tune.steps(profile.max_running, profile.context),
            gate=self.gate,
        )

    async def _in_turns(
        self, served: ServedModel, engines: Mapping[str, Engine], fp: measured.Fingerprint
    ) -> None:
        """The contenders among the profiles just measured and those measured before (the
        same that `wanted` would pick), measured again in turns (`bench.tune.in_turns`)."""
        known = measured.load(self.store, fp, served.id)
        pool = {pid: m for pid, m in known.items() if pid in engines}
        close = tune.contenders(pool)
        if not close:
            return
        log.info("measuring %s of %s again in turns", " and ".join(close), served.id)
        again = await in_turns(
            {pid: engines[pid] for pid in close}, pool, TUNE_READY_TIMEOUT_S, gate=self.gate
        )
        for m in again.values():
            measured.save(self.store, m, fp.description)
            log.info(
                "measured %s %s again in turns: %.0f tok/s alone, first token %.0f ms",
                served.id,
                m.profile,
                m.rate(1),
                m.prompt_time(128),
            )

    async def run(self) -> None:
        if self.settings.hardware is not None:
            return  # another machine's captures: nothing to measure here
        hw = await asyncio.to_thread(hardware.detect)
        fp = measured.fingerprint(hw)
        for served in self.models:
            # After every engine of the model is ready: never beside a combined profile's
            # second engine while it compiles (its start is the first user's time to share).
            for backend in served.backends:
                await backend.supervisor.ready.wait()
            new = self.wanted(served, hw, fp)
            if not new:
                continue  # all measured, and the turns were run when the figures were made
            engines: dict[str, Engine] = {}
            for profile in [*new, *self.wanted(served, hw, fp, again=True)]:
                try:
                    engines[profile.id] = await self._engine(served.entry, profile)
                    if profile.id not in {p.id for p in new}:
                        continue  # measured before: a contender for the turns only
                    m = await self._measure(served.entry, engines[profile.id], fp)
                except Exception as exc:  # tuning must never take the service down
                    engines.pop(profile.id, None)
                    log.warning("tuning %s on %s failed: %s", served.id, profile.id, exc)
                    continue
                measured.save(self.store, m, fp.description)
                log.info(
                    "measured %s %s here: %.0f tok/s alone, first token %.0f ms at 128 tokens",
                    served.id,
                    profile.id,
                    m.rate(1),
                    m.prompt_time(128),
                )
            try:
                await self._in_turns(served, engines, fp)
            except Exception as exc:  # as above
                log.warning("tuning %s in turns failed: %s", served.id, exc)


def background(
    models: Iterable[ServedModel], settings: Settings, idle: Callable[[], bool]
) -> asyncio.Task[None] | None:
    """Start background tuning when the settings ask for it; None when they do not."""
    if not settings.tune_in_background:
        return None
    return asyncio.create_task(Tuner(models, settings, idle).run(), name="background tuning")


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
