"""Admission control: at most `max_running` requests at a model's engine, a bounded queue behind.

A request that finds every slot taken and the queue full is refused at once (503 with
`Retry-After`), before the front spends anything on it; one that waits in the queue longer than
`queue_timeout_s` is refused too. The slot is held until the answer has been fully relayed
(streams included), so `num_requests_running` is exactly what the engine is working on and
`num_requests_waiting` exactly what waits in the front. One `Admission` per served model.

`close` (the drain) refuses every waiter at once and queues nobody afterwards: a request still
gets a slot that is free right away (it arrived before the drain, which waits for it), but none
waits for one, so no slot is handed on to work the drain would only cut.

A model served by several engines (a combined profile) has one `Lane` per engine, each with its
own slots; the model's capacity is their sum, and the queue and the 503 come only beyond it. A
request names the lanes that can serve it (`Want`) and gets a slot in one of them: `choose`
(`server.routing.Router.choose`) picks it among the lanes it allows whose engine is ready, or
says it must wait (its lane is full, or its engine's turn has not come: the engines take turns
on a machine's cores). Waiters are served in order: nobody overtakes a waiter that has a ready
engine to wait for, so a pending turn is not starved by newcomers; a waiter whose engines are
all still starting (or down) holds nobody back. `wake` runs that on every freed slot and when an
engine becomes ready; a new request goes through it too, behind everyone already waiting.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Gauge

from inferd.errors import DrainingError, OverloadedError


@dataclass(frozen=True)
class Limits:
    max_running: int
    max_queue: int
    queue_timeout_s: float


@dataclass
class Lane:
    """One engine of a model, as admission sees it: its slots and whether it takes requests."""

    name: str
    max_running: int
    # Whether the engine takes requests now (ready); a model with one lane leaves that to
    # `ServedModel.require_ready` and always says yes here.
    usable: Callable[[], bool] = field(default=lambda: True)
    running: int = 0
    taken: int = 0  # requests given to this lane so far (its share)

    @property
    def free(self) -> bool:
        return self.running < self.max_running and self.usable()


@dataclass(frozen=True)
class Want:
    """What one request needs of admission: the lanes that can serve it (None: any), and its
    size for the choice between them (prompt and output tokens, estimated)."""

    lanes: frozenset[int] | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0

    def allows(self, lane: int) -> bool:
        return self.lanes is None or lane in self.lanes


ANY = Want()
# Which lane takes a request now, given every lane, the ready lanes it allows (at least one),
# the request, the model's load (requests running and waiting, this one included) and how long
# it has waited (seconds); None: it waits. `server.routing.Router.choose`.
Choose = Callable[[list[Lane], list[int], Want, int, float], "int | None"]


def _first(
    lanes: list[Lane], ready: list[int], want: Want, load: int, waited_s: float = 0.0
) -> int | None:
    """One engine (or lanes without turns): the first ready lane with a free slot."""
    return next((i for i in ready if lanes[i].running < lanes[i].max_running), None)


class Slot:
    """A held place at one of the model's engines (`lane`); `release()` is idempotent."""

    def __init__(self, admission: Admission, lane: int = 0) -> None:
        self._admission = admission
        self._held = True
        self.lane = lane

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.lane)


class Admission:
    """A FIFO of waiters in front of `max_running` slots; a freed slot passes straight to the
    oldest waiter, so nobody is overtaken and the running count never dips in between."""

    def __init__(
        self,
        model: str,
        limits: Limits,
        running: Gauge,
        waiting: Gauge,
        *,
        lanes: list[Lane] | None = None,
        choose: Choose = _first,
        moments: Sequence[float] = (),
    ) -> None:
        self.model = model
        # One lane (one engine) unless given: then `limits.max_running` is the sum of the lanes'.
        self.lanes = lanes or [Lane("engine", limits.max_running)]
        self.limits = limits
        self._choose = choose
        self._running = 0
        # Waiters in order: (their slot's future, what they need, when they began to wait).
        self._queue: collections.deque[tuple[asyncio.Future[int], Want, float]] = (
            collections.deque()
        )
        # How long into a wait `choose` may answer differently (`server.routing.Router.moments`:
        # a change of turn stops waiting for the drain, a full engine's waiter moves; none for
        # one engine): a waiter refused a lane is looked at again then.
        self.moments = tuple(moments)
        self._rewake: asyncio.TimerHandle | None = None
        self._closed: str | None = None  # why nobody may queue any more (the drain)
        self._running_gauge = running.labels(model)
        self._waiting_gauge = waiting.labels(model)
        # Told after every change of what runs or waits (`server.warmup`).
        self.watchers: list[Callable[[], None]] = []

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _retry_after(self) -> int:
        # A rough wait: one queue's worth of requests at a few seconds each, at least 1 s.
        return max(1, math.ceil(len(self._queue) / max(1, self.limits.max_running)) * 2)

    def _refuse(self, why: str) -> OverloadedError:
        return OverloadedError(
            f"model {self.model} {why}; retry later", retry_after_s=self._retry_after()
        )

    def close(self, reason: str) -> None:
        """Refuse every waiter now (503 `shutting_down`, with `reason`), and queue nobody again."""
        self._closed = reason
        while self._queue:
            waiter, _, _ = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(DrainingError(reason))

    def _take(self, lane: int) -> None:
        self.lanes[lane].running += 1
        self.lanes[lane].taken += 1
        self._running += 1
        self._running_gauge.inc()

    async def acquire(self, want: Want = ANY) -> Slot:
        if want.lanes is not None and not want.lanes:
            raise self._refuse("has no engine that can serve this request")
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[int] = loop.create_future()
        entry = (handed, want, loop.time())
        # In line behind everyone waiting: a slot free for it now is handed at once.
        self._queue.append(entry)
        self.wake()
        if handed.done():
            return Slot(self, handed.result())
        self._queue.remove(entry)
        if self._closed is not None:
            raise DrainingError(self._closed)
        if len(self._queue) >= self.limits.max_queue:
            raise self._refuse(
                f"is at capacity ({self._running} running, {len(self._queue)} queued)"
            )
        self._queue.append(entry)
        self._waiting_gauge.inc()
        self._changed()
        try:
            lane = await asyncio.wait_for(asyncio.shield(handed), self.limits.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if handed.done() and not handed.cancelled() and handed.exception() is None:
                if isinstance(exc, TimeoutError):
                    return Slot(self, handed.result())  # it arrived as time ran out: use it
                self._release(handed.result())  # the client left; pass the slot on
                raise
            handed.cancel()
            if entry in self._queue:
                self._queue.remove(entry)
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    f"had no free slot within {self.limits.queue_timeout_s:g} s"
                ) from None
            raise
        finally:
            self._waiting_gauge.dec()
            self._changed()
        return Slot(self, lane)

    def _release(self, lane: int) -> None:
        self.lanes[lane].running -= 1
        self._running -= 1
        self._running_gauge.dec()
        self.wake()

    def wake(self) -> None:
        """Hand slots to waiters in order (called when a slot is freed, when an engine becomes
        ready, and for each new request): each gets the lane `choose` picks; the first that
        must wait with a ready engine stops the round, so nobody overtakes it, and is looked
        at again at its next `moments`."""
        live = [entry for entry in self._queue if not entry[0].done()]
        self._queue = collections.deque(live)
        load = self._running + len(live)
        now = asyncio.get_running_loop().time() if live else 0.0
        for entry in live:
            waiter, want, since = entry
            ready = [i for i, lane in enumerate(self.lanes) if want.allows(i) and lane.usable()]
            if not ready:
                continue  # its engines are starting (or down): it holds nobody back
            waited = now - since
            lane = self._choose(self.lanes, ready, want, load, waited)
            if lane is None:
                later = [moment for moment in self.moments if moment > waited]
                if later:
                    self._wake_at(since + min(later))
                break
            self._queue.remove(entry)
            self._take(lane)
            waiter.set_result(lane)  # the slot moves on
        self._changed()

    def _wake_at(self, when: float) -> None:
        """Look again at `when` (a waiter's patience runs out then), if nothing else has."""
        if self._rewake is not None:
            if self._rewake.when() <= when:
                return
            self._rewake.cancel()
        self._rewake = asyncio.get_running_loop().call_at(when, self._rewoken)

    def _rewoken(self) -> None:
        self._rewake = None
        self.wake()

    def _changed(self) -> None:
        for watcher in self.watchers:
            watcher()
