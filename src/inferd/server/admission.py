"""Admission control: at most `max_running` requests at a model's engine, a bounded queue behind.

A request that finds every slot taken and the queue full is refused at once (503 with
`Retry-After`), before the front spends anything on it; one that waits in the queue longer than
`queue_timeout_s` is refused too. The slot is held until the answer has been fully relayed
(streams included), so `num_requests_running` is exactly what the engine is working on and
`num_requests_waiting` exactly what waits in the front. One `Admission` per served model.

`close` (the drain) refuses every waiter at once and queues nobody afterwards: a request still
gets a slot that is free right away (it arrived before the drain, which waits for it), but none
waits for one, so no slot is handed on to work the drain would only cut.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass

from prometheus_client import Gauge

from inferd.errors import DrainingError, OverloadedError


@dataclass(frozen=True)
class Limits:
    max_running: int
    max_queue: int
    queue_timeout_s: float


class Slot:
    """A held place at the engine; `release()` is idempotent."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    """A FIFO of waiters in front of `max_running` slots; a freed slot passes straight to the
    oldest waiter, so nobody is overtaken and the running count never dips in between."""

    def __init__(self, model: str, limits: Limits, running: Gauge, waiting: Gauge) -> None:
        self.model = model
        self.limits = limits
        self._running = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed: str | None = None  # why nobody may queue any more (the drain)
        self._running_gauge = running.labels(model)
        self._waiting_gauge = waiting.labels(model)

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
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(DrainingError(reason))

    async def acquire(self) -> Slot:
        if self._running < self.limits.max_running and not self._queue:
            self._running += 1
            self._running_gauge.inc()
            return Slot(self)
        if self._closed is not None:
            raise DrainingError(self._closed)
        if len(self._queue) >= self.limits.max_queue:
            raise self._refuse(
                f"is at capacity ({self._running} running, {len(self._queue)} queued)"
            )
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(handed)
        self._waiting_gauge.inc()
        try:
            await asyncio.wait_for(asyncio.shield(handed), self.limits.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if handed.done() and not handed.cancelled() and handed.exception() is None:
                if isinstance(exc, TimeoutError):
                    return Slot(self)  # the slot arrived as time ran out: use it
                self._release()  # the client left; pass the slot on
                raise
            handed.cancel()
            if handed in self._queue:
                self._queue.remove(handed)
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    f"had no free slot within {self.limits.queue_timeout_s:g} s"
                ) from None
            raise
        finally:
            self._waiting_gauge.dec()
        return Slot(self)

    def _release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves on; the running count is unchanged
                return
        self._running -= 1
        self._running_gauge.dec()
