"""What the front knows about each model it serves, and the lookup by a request's `model`.

`cli` builds one `ServedModel` per model (catalog entry, chosen profile, what the cache prepared,
the engine's supervisor) and hands the list to `create_app`; the front never looks anything up in
the catalog or cache itself. `ServedModel.acquire` is how a request gets to the engine: with
models on demand (`server.loading`) a hold on the model loaded first, then an admission slot.
A model with a combined profile has several engines (`backends`, the first one's profile and
supervisor also as `profile` and `supervisor`); its slot says which engine the request got.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import EngineNotReadyError, InvalidRequestError, ModelNotFoundError
from inferd.server.admission import ANY, Admission, Slot, SlotWith, Want
from inferd.server.routing import Router
from inferd.server.supervisor import State, Supervisor

if TYPE_CHECKING:  # the pool holds served models; a served model asks its pool
    from inferd.server.loading import ModelPool


@dataclass(frozen=True)
class Backend:
    """One engine of a served model: the profile it runs and its supervisor."""

    profile: Profile
    supervisor: Supervisor
    # Run (in a thread) before the engine's first start, when its model is checked, or built,
    # then rather than before the service starts: a combined profile's later engines (`inferd
    # serve`); an error fails this engine alone. It is given the callback to tell the pid of a
    # child process it runs (`Supervisor.preparation`).
    check: Callable[[Callable[[int], None]], object] | None = None

    @property
    def name(self) -> str:
        return self.supervisor.engine.name


@dataclass
class ServedModel:
    entry: ModelEntry
    profile: Profile
    supervisor: Supervisor
    license_text: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    # A combined profile's other engines, in start order (they start once the first is ready),
    # and its id; empty for a single engine.
    others: tuple[Backend, ...] = ()
    combined: str | None = None
    router: Router | None = None  # which engine takes a request, with several
    # Set by `create_app`, which owns the metrics the admission gauges belong to.
    admission: Admission = field(init=False)
    # Set by `create_app` when models load on demand: the pool that starts and stops this one.
    pool: ModelPool | None = field(init=False, default=None)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Every engine of the model, the first (`supervisor`) first; lane i is backends[i]."""
        return (Backend(self.profile, self.supervisor), *self.others)

    @property
    def profile_id(self) -> str:
        return self.combined or self.profile.id

    @property
    def ready(self) -> bool:
        """Some engine of the model takes requests (with several, the others may be starting,
        restarting or failed: the one that answers serves)."""
        if self.supervisor.state is State.READY:  # every request asks: the common case first
            return True
        return any(b.supervisor.state is State.READY for b in self.others)

    @property
    def on_demand(self) -> bool:
        """Loaded on a request (not pinned): its readiness is checked once it is held loaded."""
        return self.pool is not None and not self.pool.pinned(self.id)

    async def join(self) -> None:
        """Start a combined profile's other engines once its first answers (or has failed),
        each after its model's check or build (`Backend.check`, paused while the first engine's
        users need the cores: `Supervisor.preparation`): they start at a lower CPU priority
        (`Supervisor.nice`) and take requests when ready. Run at the service's start
        (`create_app`), or at each load of the model on demand (`server.loading`)."""
        for b in self.others:
            b.supervisor.expect()
        first = asyncio.ensure_future(self.supervisor.ready.wait())
        failed = asyncio.ensure_future(self.supervisor.failed.wait())
        try:
            await asyncio.wait({first, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
            failed.cancel()
        for b in self.others:
            if b.check is not None:
                try:
                    with b.supervisor.preparation() as spawned:
                        await asyncio.to_thread(b.check, spawned)
                except Exception as exc:  # this engine fails; the first goes on serving
                    if b.supervisor.stopping:  # stopped while it was built: given up
                        return
                    b.supervisor.fail(f"its model could not be prepared: {exc}")
                    continue
            if b.supervisor.stopping:  # stopped while its model was checked: given up too
                return
            b.supervisor.start()

    def require_ready(self) -> None:
        """503 + Retry-After unless the engine answers; a model on demand passes here and is
        checked by `acquire` once loaded (its first request is what loads it)."""
        if self.on_demand:
            return
        self._check_ready()

    def _check_ready(self) -> None:
        if not self.ready:
            raise EngineNotReadyError(
                f"model {self.id} is not ready yet (engine {self.supervisor.state.value}); "
                "retry shortly"
            )

    async def acquire(self, want: Want = ANY, *, again: bool = False) -> Slot:
        """A place at an engine for one request: the model held loaded (models on demand,
        waiting while it loads), then an admission slot (in the lane of the engine it gets).
        Released by `Call.finish`. `again`: a recalled request (`Admission.acquire`)."""
        if self.pool is None:
            return await self.admission.acquire(want, again=again)
        lease = await self.pool.use(self)
        try:
            self._check_ready()  # loaded, but its engine may be restarting after a crash
            slot = await self.admission.acquire(want, again=again)
        except BaseException:
            lease.release()
            raise
        return SlotWith(slot, lease.release)  # the model stays loaded while it is held


class ModelTable:
    def __init__(self, models: list[ServedModel]) -> None:
        self._by_id = {m.id: m for m in models}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def lookup(self, model: object) -> ServedModel:
        """The served model a request's `model` field names, or the matching 400/404."""
        if model is None:
            raise InvalidRequestError("model is required", param="model")
        if not isinstance(model, str):
            raise InvalidRequestError("model must be a string", param="model")
        try:
            return self._by_id[model]
        except KeyError:
            served = ", ".join(sorted(self._by_id))
            raise ModelNotFoundError(
                f"The model `{model}` does not exist. This service serves: {served}.",
                param="model",
            ) from None
