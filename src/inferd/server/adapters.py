"""LoRA adapters served beside their base models: the set, its refresh, and the way in.

`INFERD_LORA_PATH` names a folder with one PEFT adapter per sub-folder; the sub-folder's name is
the adapter's model id. `Adapters.load` reads it (`server.adapter_folder`) before the engines
start: each adapter is read and checked (`cache.adapters`: its base model by name and by tensor
shapes, its rank, its files), placed on the served model it fits, and kept in the cache
(`cache.adapter_store`; for llama.cpp converted to GGUF there). What fails is refused with its
reason, in the log and in `/v1/metadata`, and the service serves the rest. With
`INFERD_LORA_REFRESH_S` the folder is read again on that period: a new (or changed) adapter is
added, a removed one is refused at once (404) and unloaded once its requests in flight have
finished (on llama-server by the restart below, which gives its memory back).

How an engine takes a new adapter is the engine's (`Engine.runtime_adapters`): vLLM loads it
through its load route while serving; llama-server only loads adapters at start, so its engine
is drained and restarted, when adapters come and when they go: new requests wait at `gate`
(then in admission), the ones in flight on that engine finish, the engine starts again with the
new list (1-2 s for llama-server), and the waiting requests go on. Until that restart the list
stays the one the running engine loaded, because llama-server names adapters by their place in
it. A model with several engines (a combined profile) gives every one of them each adapter, in
its own format, so a request for an adapter may go to whichever engine the router picks.
`server.proxy` asks `find` for a request's `model`, waits at `gate`, and after taking its slot
lets `ServedAdapter.use` put the adapter into the request in the terms of the slot's engine
(`Engine.use_adapter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.cache.adapter_store import StoredAdapter
from inferd.cache.store import ModelStore
from inferd.config import Settings
from inferd.engines.base import Adapter, Engine, LoraLimits
from inferd.errors import ConfigError
from inferd.server.adapter_folder import AdapterFolder, Found
from inferd.server.admission import Slot, SlotWith
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import State

log = logging.getLogger("inferd.adapters")
# A drain waits this long at most for requests in flight before restarting the engine anyway.
DRAIN_S = 60.0
# How long a request waits at the gate for a restart to end (then the engine's readiness decides).
GATE_S = 60.0


@dataclass
class ServedAdapter:
    """One adapter being served, on one base model."""

    name: str
    base: ServedModel
    stored: StoredAdapter
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0
    removed: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def engine_adapter(self) -> Adapter:
        return Adapter(self.name, self.stored.path, self.stored.gguf)

    def use(self, slot: Slot, engine: Engine, payload: dict[str, Any]) -> Slot:
        """Run this request with the adapter (in place) on `engine`, the one its slot names,
        counted in flight until its slot goes."""
        engine.use_adapter(payload, self.name)
        self.inflight += 1
        self.idle.clear()
        return SlotWith(slot, self.done)

    def done(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "parent": self.base.id,
            "rank": self.stored.rank,
            "digest": self.stored.digest,
            "path": str(self.stored.path),
        }


class Adapters:
    """The adapters of one service (empty when INFERD_LORA_PATH is not set)."""

    def __init__(
        self,
        folder: Path | None = None,
        models: list[ServedModel] | None = None,
        store: ModelStore | None = None,
        *,
        refresh_s: float = 0.0,
        max_rank: int = 64,
        max_loras: int = 4,
        public_key: Path | None = None,
    ) -> None:
        self.folder = folder
        self.refresh_s = refresh_s
        chat = [m for m in models or [] if m.entry.task in ("chat", "completion")]
        self._reader: AdapterFolder | None = None
        if folder is not None and store is not None:
            self._reader = AdapterFolder(folder, chat, store, max_rank, public_key)
        self.served: dict[str, ServedAdapter] = {}
        self.refused: dict[str, str] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        if self._reader is not None:
            for m in chat:
                for backend in m.backends:
                    backend.supervisor.engine.lora = LoraLimits(max_rank, max_loras)

    @classmethod
    def from_settings(
        cls, settings: Settings, models: list[ServedModel], store: ModelStore
    ) -> Adapters:
        """The service's adapters, read (checked, cached, converted) before the engines start;
        an empty set without INFERD_LORA_PATH."""
        folder = settings.lora_path
        if folder is None:
            return cls()
        if not folder.is_dir():
            raise ConfigError(f"INFERD_LORA_PATH / --lora-path: {folder} is not a folder")
        adapters = cls(
            folder,
            models,
            store,
            refresh_s=settings.lora_refresh_s,
            max_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
            # INFERD_REQUIRE_SIGNED: each adapter's cached copy must be signed, as models are.
            public_key=settings.signing_public_key if settings.require_signed else None,
        )
        adapters.load()
        return adapters

    def summary(self) -> str:
        """One line for `inferd serve`'s start-up report."""
        served = ", ".join(f"{a.name} on {a.base.id}" for a in self.served.values()) or "none"
        refused = f"; refused {', '.join(sorted(self.refused))}" if self.refused else ""
        every = f"re-read every {self.refresh_s:g} s" if self.refresh_s else "read at start only"
        return f"{served}{refused} ({self.folder}, {every})"

    # ------------------------------------------------------------------ requests

    def find(self, model: object) -> ServedAdapter | None:
        """The adapter a request's `model` names (None: not an adapter id)."""
        if not isinstance(model, str):
            return None
        return self.served.get(model)

    def plain(self, engine: Engine, payload: dict[str, Any]) -> bool:
        """A base-model request on an engine that holds adapters (the one its slot names): none
        applied, in that engine's terms (`Engine.use_base`); True when the payload changed."""
        return self._reader is not None and engine.use_base(payload)

    async def gate(self, served: ServedModel) -> None:
        """Wait while `served`'s engine restarts to load new adapters."""
        gate = self._gates.get(served.id)
        if gate is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), GATE_S)

    # ------------------------------------------------------------------ listing

    def models_listed(self) -> list[dict[str, Any]]:
        """Each adapter as an OpenAI `Model`, with its base model as `parent` and `root`."""
        return [
            {
                "id": a.name,
                "object": "model",
                "created": a.created,
                "owned_by": "inferd",
                "parent": a.base.id,
                "root": a.base.id,
                "max_model_len": a.base.supervisor.engine.context,
            }
            for a in self.served.values()
        ]

    def describe(self) -> dict[str, Any]:
        """For /v1/metadata: where adapters come from, which are served, which refused and why."""
        return {
            "path": str(self.folder) if self.folder else None,
            "refresh_s": self.refresh_s,
            "served": [a.describe() for a in self.served.values()],
            "refused": [{"id": n, "reason": r} for n, r in sorted(self.refused.items())],
        }

    # ------------------------------------------------------------------ reading the folder

    def load(self) -> None:
        """The first read, before the engines start: they start with these adapters."""
        for name, found in self._scan().items():
            self._record(name, found)
            if found.stored is not None and found.base is not None:
                adapter = ServedAdapter(name, found.base, found.stored)
                self.served[name] = adapter
                for backend in found.base.backends:
                    engine = backend.supervisor.engine
                    engine.adapters = (*engine.adapters, adapter.engine_adapter)

    def _scan(self) -> dict[str, Found]:
        return {} if self._reader is None else self._reader.scan()

    @property
    def _seen(self) -> dict[str, Found]:
        return {} if self._reader is None else self._reader.seen

    def _record(self, name: str, found: Found) -> None:
        self._seen[name] = found
        if found.reason:
            self.refused[name] = found.reason
            log.warning("adapter %s refused: %s", name, found.reason)
        else:
            self.refused.pop(name, None)
            assert found.base is not None
            log.info("adapter %s ready on %s", name, found.base.id)

    # ------------------------------------------------------------------ refresh

    def start(self) -> None:
        if self.folder is not None and self.refresh_s > 0:
            self._task = asyncio.create_task(self._refresh_loop(), name="adapter refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # one bad scan must not end refreshing
                log.exception("refreshing the adapters failed")

    async def refresh(self) -> None:
        """Read the folder again; serve what is new or changed, retire what went."""
        async with self._lock:
            found = await asyncio.to_thread(self._scan)
            gone = [a for n, a in self.served.items() if n not in found or found[n].reason]
            changed = [
                a
                for n, a in self.served.items()
                if n in found and found[n].stored is not None and found[n].stored != a.stored
            ]
            for name in set(self._seen) - set(found):
                self._seen.pop(name, None)
                self.refused.pop(name, None)
            for name, item in found.items():
                if self._seen.get(name) is not item:
                    self._record(name, item)
            for adapter in [*gone, *changed]:
                await self._retire(adapter)
            new = [
                ServedAdapter(n, f.base, f.stored)
                for n, f in found.items()
                if f.stored is not None and f.base is not None and n not in self.served
            ]
            touched = [*gone, *changed, *new]
            for base in {a.base.id: a.base for a in touched}.values():
                await self._apply(base, [a for a in new if a.base is base])

    async def _retire(self, adapter: ServedAdapter) -> None:
        """Refuse it from now on; unload it once its requests in flight are done."""
        self.served.pop(adapter.name, None)
        adapter.removed = True
        log.info("adapter %s removed; %d request(s) in flight finish", adapter.name,
                 adapter.inflight)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(adapter.idle.wait(), DRAIN_S)
        for backend in adapter.base.backends:
            engine = backend.supervisor.engine
            if not engine.runtime_adapters:
                # The list changes when the engine restarts (`_apply`): until then the requests
                # of the other adapters are still given the ids the running engine loaded them
                # under.
                continue
            engine.adapters = tuple(a for a in engine.adapters if a.name != adapter.name)
            if backend.supervisor.state is State.READY:
                body = {"lora_name": adapter.name}
                if await self._post(adapter.base.id, backend, "/v1/unload_lora_adapter", body):
                    log.info("adapter %s unloaded from %s", adapter.name, engine.name)

    async def _apply(self, base: ServedModel, new: list[ServedAdapter]) -> None:
        """Give each of `base`'s engines its new adapter set: `new` added, the retired ones
        gone. An adapter is served once every engine of the model that can serve has it."""
        loaded = {a.name for a in new}
        for lane, backend in enumerate(base.backends):
            if backend.supervisor.failed.is_set():
                continue  # gone for good: the model's other engines serve
            loaded &= await self._apply_on(base, lane, backend, new)
        for a in new:
            if a.name in loaded:
                self.served[a.name] = a
            else:
                self._seen.pop(a.name, None)  # not served; forgotten, so the next scan retries

    async def _apply_on(
        self, base: ServedModel, lane: int, backend: Backend, new: list[ServedAdapter]
    ) -> set[str]:
        """One engine's new adapter set; the names of `new` it serves."""
        engine = backend.supervisor.engine
        running = backend.supervisor.state is not State.STOPPED
        if engine.runtime_adapters:
            engine.adapters = (*engine.adapters, *(a.engine_adapter for a in new))
            if not running:
                return {a.name for a in new}  # it starts with them
            await self._until_ready(backend)  # a start under way has its command line already
            loaded: set[str] = set()
            for a in new:
                body = {"lora_name": a.name, "lora_path": str(a.stored.path)}
                if await self._post(base.id, backend, "/v1/load_lora_adapter", body):
                    loaded.add(a.name)
                else:
                    engine.adapters = tuple(x for x in engine.adapters if x.name != a.name)
            return loaded
        # Loaded at start only (llama-server): one restart with the whole new list, so a removed
        # adapter's memory is given back and every id matches what the new engine loaded.
        kept = [a for a in self.served.values() if a.base is base]
        wanted = tuple(a.engine_adapter for a in [*kept, *new])
        if wanted != engine.adapters:
            if running:
                await self._restart(base, lane, backend, wanted)
            else:
                engine.adapters = wanted
        return {a.name for a in new}

    @staticmethod
    async def _until_ready(backend: Backend) -> None:
        """Until the engine is ready or has failed (bounded by its start-up limit)."""
        sup = backend.supervisor
        ready = asyncio.ensure_future(sup.ready.wait())
        failed = asyncio.ensure_future(sup.failed.wait())
        try:
            await asyncio.wait(
                {ready, failed}, timeout=sup.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in (ready, failed):
                waiter.cancel()

    async def _restart(
        self, base: ServedModel, lane: int, backend: Backend, adapters: tuple[Adapter, ...]
    ) -> None:
        """Drain one of `base`'s engines and start it again with `adapters`. With one engine,
        the requests waiting in admission wait for it; with several, the router gives them the
        others (this one is not ready while it restarts) and only its own requests drain."""
        gate = self._gates[base.id] = asyncio.Event()
        started = time.monotonic()
        sup = backend.supervisor
        try:
            deadline = started + DRAIN_S
            while _busy(base, lane):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            await sup.stop()
            sup.engine.adapters = adapters
            sup.start()
            await self._until_ready(backend)
            log.info(
                "engine %s for %s restarted with %d adapter(s) in %.1f s",
                sup.engine.name,
                base.id,
                len(sup.engine.adapters),
                time.monotonic() - started,
            )
        finally:
            del self._gates[base.id]
            gate.set()

    async def _post(self, model: str, backend: Backend, path: str, body: dict[str, Any]) -> bool:
        sup = backend.supervisor
        link = sup.link
        if link is None:
            return False
        try:
            with sup.awake():  # a resting engine (`Supervisor.rest`) wakes for it
                async with link.pool.post(
                    link.url(path), json=body, headers=sup.auth_headers()
                ) as r:
                    text = await r.text()
                if r.status != 200:
                    log.warning("%s %s: %s %s", model, path, r.status, text[:300])
                return r.status == 200
        except Exception as exc:  # the engine went away: its restart loads engine.adapters
            log.warning("%s %s failed: %s", model, path, exc)
            return False


def _busy(base: ServedModel, lane: int) -> bool:
    """Whether engine `lane` of `base` still has requests to finish before it restarts."""
    admission = base.admission
    if len(admission.lanes) == 1:
        return bool(admission.running or admission.waiting)
    return admission.lanes[lane].running > 0
