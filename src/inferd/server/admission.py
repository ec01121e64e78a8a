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

A change of turn can take back (recall) what the old engine has not begun to answer: a request
whose slot was handed on its engine's turn, and whose engine has sent nothing back yet
(`Slot.recallable` until `Slot.settled`), for at most `RECALL_S` (a whole answer: while its
prompt may still be computing). A burst's first requests are
given out one by one as they arrive, the first at a load of one, so they go to the engine that
serves one user best; the arrival that shows the crowd changes the turn, and without a recall
the crowd's engine would idle while the old one worked through them (measured on a 2-core Zen
4: sixteen requests sent at once, three of them on llama.cpp for 2.8 s while thirteen waited
for vLLM). A recalled request gives back its slot and waits again, first in line; nothing of
it has reached its client, so it is as if it had arrived a moment later. It gives the slot back
only once its engine has finished the prompts it was computing: an engine drops a cancelled
request after the batch at hand, and llama.cpp's batch beside a busy vLLM is many times slower
than alone (its threads wait on each other at every step): one cancelled prompt of 140 tokens
took llama.cpp 10 s, at half the cores, beside vLLM's sixteen. An engine that says what it is
working on (llama.cpp's slots) is asked until it works on no more than it `kept` (at most as
long as a change of turn waits for a drain, however long the prompt's time alone); otherwise
the slot is held for as long as the prompts can take (`Recall.linger_s`, an upper bound from
the engine's prompt speed: the crowd's engine waits that long, which at three prompts was 1 s
where llama.cpp had finished after 0.3).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import Gauge

from inferd.errors import DrainingError, OverloadedError

# How long after its slot was handed a streamed request may still be recalled at a change of
# turn (until its first token, which settles it): its engine's work on it is lost, so only a
# request that has barely begun moves.
RECALL_S = 1.0
# When the line is looked at again after a recalled request gave back its slot, should the
# request not ask for one again (its client gone meanwhile).
RECALL_REWAKE_S = 0.25
# How long a request that has ended counts in the load as its client's next one (`_returning`):
# a client in a loop sends its next request within milliseconds of an answer, and a batch of
# equal answers ends all at once. Without it, the first of the next wave found nothing running
# and was judged as one user alone (measured on a 2-core Zen 4: eight users' wave of 128-token
# answers from vLLM, the next wave's first request went to llama.cpp and the wave waited 5 s).
RETURN_S = 0.25
# A burst is read whole before its requests are judged (`Admission.gathered`): a request that
# came within BURST_GAP_S of the one before waits until none has come for BURST_QUIET_S, at
# most BURST_WAIT_S. A burst's requests come less than a millisecond apart; users on their own
# rarely within a few.
BURST_GAP_S = 0.005
BURST_QUIET_S = 0.002
BURST_WAIT_S = 0.02


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
    taken: int = 0  # requests given to this lane so far (its share), recalled ones not counted
    recalled: int = 0  # requests taken back from this lane at a change of turn

    @property
    def free(self) -> bool:
        return self.running < self.max_running and self.usable()


@dataclass(frozen=True)
class Want:
    """What one request needs of admission: the lanes that can serve it (None: any), and its
    size for the choice between them (prompt and output tokens, estimated). `turns`: whether it
    takes part in the engines' turns. One that computes next to nothing (tokenize) does not: any
    ready engine answers it in milliseconds, so it changes nobody's turn, is never recalled and
    does not count as its client's next request (load generators tokenize before a burst, and a
    tokenize judged as one user alone handed the turn to llama.cpp just before each crowd)."""

    lanes: frozenset[int] | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    turns: bool = True

    def allows(self, lane: int) -> bool:
        return self.lanes is None or lane in self.lanes


ANY = Want()
# Which lane takes a request now, given every lane, the ready lanes it allows (at least one),
# the request, the model's load (requests running, waiting, arriving and about to return, this
# one included: `Admission.wake`) and how long it has waited (seconds); None: it waits.
# `server.routing.Router.choose`.
Choose = Callable[[list[Lane], list[int], Want, int, float], "int | None"]


def _first(
    lanes: list[Lane], ready: list[int], want: Want, load: int, waited_s: float = 0.0
) -> int | None:
    """One engine (or lanes without turns): the first ready lane with a free slot."""
    return next((i for i in ready if lanes[i].running < lanes[i].max_running), None)


class Recall(asyncio.Event):
    """Set when a change of turn takes a request back (`Slot.recallable`). `linger_s`: how long
    its slot is still held (its engine may be computing its prompt: see the module's docstring).
    `until`: the moment (`time.monotonic`) after which no change of turn takes a stream back
    (`RECALL_S` after its slot was handed)."""

    linger_s = 0.0
    until = math.inf


class Slot:
    """A held place at one of the model's engines (`lane`); `release()` is idempotent.
    `on_turn`: handed on its engine's turn (a request a change of turn may take back)."""

    def __init__(
        self, admission: Admission, lane: int = 0, want: Want = ANY, on_turn: bool = False
    ) -> None:
        self._admission = admission
        self._held = True
        self.lane = lane
        self.want = want
        self.on_turn = on_turn
        self.handed_at = time.monotonic()
        self.recalled = False
        self.streamed = True

    def recallable(self, *, streamed: bool = True) -> Recall | None:
        """An event set if a change of turn takes this request back before `settled` (its
        engine has answered), within `RECALL_S` for a stream, while its prompt may still be
        computing for a whole answer; None when nothing can (one engine, or a slot handed off
        its engine's turn: a waiter that took another engine's free slot)."""
        if not self.on_turn or not self._held:
            return None
        self.streamed = streamed
        recall = self._admission._recallable[self] = Recall()
        if streamed:
            recall.until = self.handed_at + RECALL_S
        return recall

    def settled(self) -> None:
        """Its engine has begun to answer: it stays there (a recall that came as it did is
        void)."""
        self._admission._forget(self)
        self.recalled = False

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._forget(self)
            self._admission._release(self.lane, recalled=self.recalled, returns=self.want.turns)


class SlotWith(Slot):
    """An admission slot that also holds something else, given back once with it (`also`: a
    model held loaded, an adapter's count of requests in flight). Slot's own fields are never
    used: the wrapped slot keeps them."""

    def __init__(self, slot: Slot, also: Callable[[], None]) -> None:
        self._slot = slot
        self._also: Callable[[], None] | None = also
        self.lane = slot.lane

    def recallable(self, *, streamed: bool = True) -> Recall | None:
        return self._slot.recallable(streamed=streamed)

    def settled(self) -> None:
        self._slot.settled()

    def release(self) -> None:
        self._slot.release()
        also, self._also = self._also, None
        if also is not None:
            also()


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
        turn: Callable[[], int | None] = lambda: None,
        prompt_s: Callable[[int, Want], float] = lambda lane, want: 0.0,
        alone: Callable[[list[int], Want], int | None] = lambda ready, want: None,
    ) -> None:
        self.model = model
        # One lane (one engine) unless given: then `limits.max_running` is the sum of the lanes'.
        self.lanes = lanes or [Lane("engine", limits.max_running)]
        self.limits = limits
        self._choose = choose
        self._running = 0
        # Waiters in order: (their slot's future, what they need, when they began to wait).
        self._queue: collections.deque[tuple[asyncio.Future[Slot], Want, float]] = (
            collections.deque()
        )
        # How long into a wait `choose` may answer differently (`server.routing.Router.moments`:
        # a change of turn stops waiting for the drain, a full engine's waiter moves; none for
        # one engine): a waiter refused a lane is looked at again then.
        self.moments = tuple(moments)
        self._rewake: asyncio.TimerHandle | None = None
        # Whose turn it is (`server.routing.Router.turn_now`; None: no turns), and the requests
        # a change of it may take back (see the module's docstring).
        self._turn = turn
        self._prompt_s = prompt_s  # `Router.prompt_s`: one prompt's seconds on a lane, alone
        self._alone = alone  # `Router.alone`: the lane of a request that runs alone
        self._recallable: dict[Slot, Recall] = {}
        self._lingering: set[Slot] = set()  # recalled, their slots not given back yet
        self._again: set[asyncio.Future[Slot]] = set()  # recalled requests waiting
        self._coming = 0  # requests on their way to `acquire` (`arriving`)
        self._arrivals = 0  # requests that ever began `arriving` (`gathered` watches it)
        self._arrived_at = -math.inf  # when the last one did
        self._returns: collections.deque[float] = collections.deque()  # see `_returning`
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

    @contextlib.contextmanager
    def arriving(self) -> Iterator[bool]:
        """A request on its way to `acquire` (read, checked, through its input rails): counted
        in the load the router judges by. A burst's requests arrive together but reach
        admission one by one, the first while the others are still being read; without them
        the first is judged as one user alone. Gives whether this request came right after
        another (within `BURST_GAP_S`: a burst's, for `gathered`)."""
        if self._returning():  # the next request of a client whose request just ended
            self._returns.popleft()
        now = time.monotonic()
        close = now - self._arrived_at < BURST_GAP_S
        self._arrived_at = now
        self._coming += 1
        self._arrivals += 1
        try:
            yield close
        finally:
            self._coming -= 1

    async def gathered(self, close: bool, want: Want = ANY) -> None:
        """Wait, on its way (`arriving`), until a burst this request came in (`close`: it came
        right after another) has reached admission whole. A burst's requests are read one by
        one; each judged before the next is read goes to the engine of one user alone, and is
        recalled once the crowd shows, after that engine has begun its prompt, which the
        crowd's engine then waits for (measured on a 2-core Zen 4: sixteen requests sent within
        2 ms, the first three judged at loads of one to three; llama.cpp computed their prompts
        for 0.35 s while vLLM waited). A request on its own goes on after one turn of the event
        loop; one of a burst once none has come for `BURST_QUIET_S` (at most `BURST_WAIT_S`).

        A burst's first request cannot know it is one. It waits as the others do only where the
        model is idle with the turn still at another engine than the one it would take alone
        (`_after_a_crowd`): a crowd's, whose next burst would otherwise begin with its first
        request on one user's engine, recalled when the rest arrive, and the crowd's engine
        waiting for that prompt (measured on a 2-core Zen 5: 0.3-0.6 s at every burst after a
        pause, four to sixteen users 2-3% below vLLM alone). It waits `BURST_GAP_S` for the
        next arrival, then as the others do. One user after a crowd pays that once; one user
        in a loop never (the turn is already theirs)."""
        await asyncio.sleep(0)
        if not want.turns or (not close and not self._after_a_crowd(want)):
            return  # (a request outside the turns goes to any engine, whatever the load)
        loop = asyncio.get_running_loop()
        end = loop.time() + BURST_WAIT_S
        seen = None
        # A first request waits for a burst's gap: what comes within it is its burst, by the
        # rule that makes the others `close` (a client's first request often goes out on a
        # connection it already holds, the others after a connect each: measured with vLLM's
        # serving benchmark, sixteen arrive over 2 ms on an idle machine and 5-7 ms in the
        # front on a 2-core one).
        quiet = BURST_QUIET_S if close else BURST_GAP_S
        while seen != self._arrivals and loop.time() < end:
            seen = self._arrivals
            await asyncio.sleep(quiet)
            quiet = BURST_QUIET_S

    def _after_a_crowd(self, want: Want) -> bool:
        """Whether `want`, arriving on its own, may be a burst's first: nothing runs or is about
        to return, and the turn is another engine's than the one it would take alone."""
        turn = self._turn()
        if turn is None or self._running or self._returning():
            return False
        ready = self._ready(want)
        return bool(ready) and self._alone(ready, want) not in (None, turn)

    def _ready(self, want: Want) -> list[int]:
        """The lanes `want` allows whose engines take requests now."""
        return [i for i, lane in enumerate(self.lanes) if want.allows(i) and lane.usable()]

    def _returning(self) -> int:
        """Requests ended within `RETURN_S` whose clients have not sent another yet (each
        arrival takes one): counted in the load as about to come back."""
        now = time.monotonic()
        while self._returns and now - self._returns[0] > RETURN_S:
            self._returns.popleft()
        return len(self._returns)

    def _forget(self, slot: Slot) -> None:
        """`slot` can no longer be recalled, nor is it lingering (settled, or given back)."""
        self._recallable.pop(slot, None)
        self._lingering.discard(slot)

    def kept(self, lane: int) -> int:
        """The requests lane `lane`'s engine is meant to be working on: its slots, less those of
        recalled requests not given back yet (their engine may still compute their prompts)."""
        gone = sum(1 for slot in self._lingering if slot.lane == lane)
        return self.lanes[lane].running - gone

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

    def _take(self, lane: int, want: Want) -> Slot:
        self.lanes[lane].running += 1
        self.lanes[lane].taken += 1
        self._running += 1
        self._running_gauge.inc()
        return Slot(self, lane, want, on_turn=want.turns and lane == self._turn())

    async def acquire(self, want: Want = ANY, *, again: bool = False) -> Slot:
        """A slot for `want`, at once or after waiting in line. `again`: a recalled request,
        first in line (it had a slot) and never refused for a full queue."""
        if want.lanes is not None and not want.lanes:
            raise self._refuse("has no engine that can serve this request")
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[Slot] = loop.create_future()
        entry = (handed, want, loop.time())
        # In line behind everyone waiting: a slot free for it now is handed at once.
        self._line_up(entry, again)
        self.wake()
        if handed.done():
            return handed.result()
        self._queue.remove(entry)
        if self._closed is not None:
            raise DrainingError(self._closed)
        if not again and len(self._queue) >= self.limits.max_queue:
            raise self._refuse(
                f"is at capacity ({self._running} running, {len(self._queue)} queued)"
            )
        self._line_up(entry, again)
        self._waiting_gauge.inc()
        self._changed()
        try:
            slot = await asyncio.wait_for(asyncio.shield(handed), self.limits.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if handed.done() and not handed.cancelled() and handed.exception() is None:
                if isinstance(exc, TimeoutError):
                    return handed.result()  # it arrived as time ran out: use it
                handed.result().release()  # the client left; pass the slot on
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
        return slot

    def _line_up(self, entry: tuple[asyncio.Future[Slot], Want, float], again: bool) -> None:
        """Last in line; a recalled request (`again`) before everyone but the requests
        recalled before it."""
        if not again:
            self._queue.append(entry)
            return
        self._again.add(entry[0])
        entry[0].add_done_callback(self._again.discard)
        place = next(
            (i for i, (w, _, _) in enumerate(self._queue) if w not in self._again),
            len(self._queue),
        )
        self._queue.insert(place, entry)

    def _release(self, lane: int, *, recalled: bool = False, returns: bool = True) -> None:
        self.lanes[lane].running -= 1
        self._running -= 1
        self._running_gauge.dec()
        if recalled:  # its share goes to the engine that answers it
            self.lanes[lane].taken -= 1
            self.lanes[lane].recalled += 1
            # Its request asks again at once (`acquire(again=True)`), and that wakes the line:
            # judged now, the load would miss it (a crowd of two seen as one user, handed
            # back to the old engine). Should it never ask again, the line moves on shortly.
            asyncio.get_running_loop().call_later(RECALL_REWAKE_S, self.wake)
            return
        if returns and len(self.lanes) > 1:  # only a choice between engines reads the load
            self._returns.append(time.monotonic())
        self.wake()

    def wake(self) -> None:
        """Hand slots to waiters in order (called when a slot is freed, when an engine becomes
        ready, and for each new request): each gets the lane `choose` picks; the first that
        must wait with a ready engine stops the round, so nobody overtakes it, and is looked
        at again at its next `moments`."""
        live = [entry for entry in self._queue if not entry[0].done()]
        self._queue = collections.deque(live)
        load = self._running + len(live) + self._coming + self._returning()
        now = asyncio.get_running_loop().time() if live else 0.0
        for entry in live:
            waiter, want, since = entry
            ready = self._ready(want)
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
            waiter.set_result(self._take(lane, want))  # the slot moves on
        if self._queue and self._recallable:
            self._recall()
        self._changed()

    def _recall(self) -> None:
        """Take back, for the engine whose turn it now is, the requests given to another on
        its own turn that it has not begun to answer (see the module's docstring)."""
        turn = self._turn()
        if turn is None or not self.lanes[turn].usable():
            return
        now = time.monotonic()
        for slot, recall in list(self._recallable.items()):
            if slot.lane == turn or not slot.want.allows(turn):
                continue
            del self._recallable[slot]
            # Its engine's batch began at most when the slot was handed, with at most every
            # request its lane runs.
            batch = self._prompt_s(slot.lane, slot.want) * self.lanes[slot.lane].running
            # A stream shows that its engine has begun by its first token (`settled`); a whole
            # answer shows nothing until done, so it moves only while its prompt may still be
            # computing (llama-server notices the closed connection of a whole answer only at
            # its poll, once a second, and decodes on meanwhile).
            if now - slot.handed_at > (RECALL_S if slot.streamed else batch):
                continue
            slot.recalled = True
            self._lingering.add(slot)
            recall.linger_s = max(0.0, slot.handed_at + batch - now)
            recall.set()

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
