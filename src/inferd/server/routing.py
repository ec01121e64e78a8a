"""Which engine takes a request, for a model served by several (a combined profile).

The engines share the machine's cores, and two engines busy at once are much slower than
either alone: measured on the 2-core EPYC, two requests on each took 8.5 s for 128 tokens
where the sum of their steps says 4.7, and vLLM alone ran all four in 2.6 (benchmarks/
RESULTS.md). So the engines take turns: requests run on one engine at a time, and a change of
engine waits for the one running to finish what it has (its drain), with the requests that
arrive meanwhile waiting in admission's queue, in order.

Which engine's turn it is follows the load (requests running, waiting and on their way to
admission, this one included, and those that ended within `admission.RETURN_S` whose clients
have not sent their next yet: a batch of equal answers ends all at once, and the next wave's
first request would otherwise find nothing running) and the engines' speed on this machine
(`inferd tune`'s figures, or the catalog's reference ones): the rate of an engine at load L,
for requests the size of this one (P prompt tokens, O output tokens), is
`n * O / (n * prompt(P) + O * step(n))` tokens per millisecond for everyone together,
n = min(L, slots). The prompts count: each newcomer's prompt holds up the others'
steps while it is computed, and in a steady load each request sees about n of them. Measured
on a 2-core Zen 4 (benchmarks/RESULTS.md), four users of 128 in / 128 out got 140 tok/s from
llama.cpp and 192 from vLLM, where the steps alone (23 and 20 ms) said 1.15 times and the
prompts (147 and 55 ms) make it 1.27.
- When no engine runs anything, one request alone goes to the engine that finishes it soonest,
  `prompt(prompt tokens) + output tokens * step(1)` (llama.cpp for a chat answer on a CPU,
  vLLM's faster prompts for a long prompt with a short answer); more (a burst, or waiters at a
  change of turn) go to the engine with the best rate at that load.
- While an engine runs requests, newcomers join it, unless another engine's rate at the load is
  more than `SWITCH_MARGIN` times its own: then its turn ends (it takes no more and drains). The
  turn, once changed, holds until the same test changes it again (not each time the draining
  engine finishes a request and the load seen drops by one). The margin keeps a load near the
  crossing from switching back and forth, each switch costing a drain. On a Zen 4's figures:
  one to three users stay on llama.cpp; four and more move to vLLM's batches; back to one,
  llama.cpp again.
- At a change of turn, admission takes back what the old engine has not begun to answer
  (`admission.Admission` recalls it): a burst arrives one request at a time, so its first
  requests were given to the engine that serves one to three users best.
- A request only some engines can serve (`tool_choice: required`: vLLM) waits for one of
  them; as nobody overtakes a waiter, the turn passes to its engine once the other drains.
- A request that computes next to nothing (tokenize: `Want.turns` false) stays outside the
  turns: an engine with room answers it (one at work first; the other may be resting), and
  whose turn it is does not change. Judged as one user alone, the tokenize a load generator
  sends before each burst (vLLM's serving benchmark does) gave the turn to llama.cpp, so the
  burst's first request went there and was recalled (measured on a 2-core Zen 5: the crowd
  waited 0.3-0.6 s for that prompt at every burst).
- A change of turn waits at most `TURN_WAIT_S` for the drain; then the new engine starts
  beside the old one's last requests.
- A waiter whose engine is full waits for it, however long the other engine's free slots
  stay free, until it has waited nine tenths of the queue's limit (`spill_wait_s`): then it
  takes a free slot of the other engine rather than be refused. The model's capacity is the
  sum of its engines' slots, as admission's queue is sized, and nobody waits out the queue's
  limit while an engine has room; but a waiter moved sooner runs both engines at once, which on
  a small CPU slows everyone many times over. Measured on a 2-core Zen 3, where llama.cpp is
  faster than vLLM at every load (benchmarks/RESULTS.md): with waiters moved after 5 s, eight
  users' 128-token answers took 48 s each; moved after 15 s, sixteen users' took 60-79 s once
  they moved, where llama.cpp alone answers four every 5.5 s.

Only the choice is made here; `admission.Admission` keeps the slots, the queue and its order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from inferd.server.admission import Lane, Want

# Output tokens assumed for a request that does not say (no max_tokens): a typical chat answer.
DEFAULT_OUTPUT_TOKENS = 256
# Bytes of request body per prompt token, for the prompt-size estimate (English text and JSON
# average about 4; the estimate only weighs prompt time against decoding time).
BYTES_PER_TOKEN = 4
# How much faster (in tokens per second at the present load) another engine must be for the
# running engine's turn to end: each change costs a drain.
SWITCH_MARGIN = 1.25
# How long a change of turn waits for the running engine to drain; past it, the new engine
# starts beside the old one's last requests (both slower meanwhile), so that a slow drain (long
# answers, or a machine busy with other work) never makes a crowd wait out the queue's limit
# while the new engine has room.
TURN_WAIT_S = 5.0
# How long a waiter whose engine is full waits for it before it takes another engine's free
# slot, as a share of the queue's limit: only to avoid a refusal, as late as the queue's timer
# allows (see the module's docstring: a crowd the turn's engine serves faster alone stays on
# it).
SPILL_SHARE = 0.9


class Speed(Protocol):
    """An engine's measured speed on this machine (`catalog.measured.Measurement`)."""

    def prompt_time(self, tokens: int) -> float:  # ms to the first token, alone
        ...

    def step_time(self, running: int) -> float:  # ms per decoding step with `running` requests
        ...


@dataclass(frozen=True)
class Table:
    """Speed figures as points (prompt tokens -> ms; running requests -> ms per step),
    interpolated linearly and extended past the last point along the last segment."""

    prompt_ms: Mapping[int, float]
    step_ms: Mapping[int, float]

    def prompt_time(self, tokens: int) -> float:
        return _interpolate(self.prompt_ms, tokens)

    def step_time(self, running: int) -> float:
        return 0.0 if running <= 0 else _interpolate(self.step_ms, running)


def _interpolate(points: Mapping[int, float], x: float) -> float:
    xs = sorted(points)
    if not xs:
        return 0.0
    if len(xs) == 1:
        return points[xs[0]]
    if x <= xs[0]:
        lo, hi = xs[0], xs[1]
    elif x >= xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(p for p in xs if p >= x)
        lo = xs[xs.index(hi) - 1]
    slope = (points[hi] - points[lo]) / (hi - lo)
    return max(0.0, points[lo] + slope * (x - lo))


class Router:
    """Picks which engine's turn it is and whether a request may start now (see the module's
    docstring). `speeds`: one per lane, in lane order."""

    def __init__(self, speeds: Sequence[Speed], *, queue_timeout_s: float = 30.0) -> None:
        self.speeds = list(speeds)
        self.spill_wait_s = SPILL_SHARE * queue_timeout_s
        self.turn_wait_s = min(TURN_WAIT_S, self.spill_wait_s)
        # Whose turn it is while some engine runs requests: kept once decided, so that a change
        # holds through the drain it waits for (each request the old engine finishes lowers the
        # load by one until its client sends the next: judged again at that lower load, four
        # users would go back to the old engine at every finish and never move).
        self._turn: int | None = None

    @property
    def turn_now(self) -> int | None:
        """The lane whose turn it is (None before the first request): admission takes back,
        at a change of it, what the old engine has not begun to answer."""
        return self._turn

    @property
    def moments(self) -> tuple[float, float]:
        """How long into a wait `choose` may answer differently (admission looks again then)."""
        return self.turn_wait_s, self.spill_wait_s

    def cost(self, lane: int, want: Want) -> float:
        """The milliseconds `want` takes alone on lane `lane`: its prompt, then its output."""
        speed = self.speeds[lane]
        return speed.prompt_time(want.prompt_tokens) + _output(want) * speed.step_time(1)

    def alone(self, ready: list[int], want: Want) -> int:
        """The lane (of `ready`) that finishes `want` soonest when it runs alone (ties go to the
        earlier lane: the engine that starts first)."""
        return min(ready, key=lambda i: (self.cost(i, want), i))

    def prompt_s(self, lane: int, want: Want) -> float:
        """Seconds `want`'s prompt takes alone on lane `lane`."""
        return self.speeds[lane].prompt_time(want.prompt_tokens) / 1000

    def rate(self, lane: Lane, index: int, load: int, want: Want) -> float:
        """Tokens per millisecond lane `index` gives `load` requests the size of `want`
        together (as many as it has slots for running), their prompts included."""
        n = max(1, min(load, lane.max_running))
        speed = self.speeds[index]
        output = _output(want)
        took = n * speed.prompt_time(want.prompt_tokens) + output * speed.step_time(n)
        return n * output / took if took > 0 else float("inf")

    def _fastest(self, lanes: list[Lane], among: list[int], load: int, want: Want) -> int:
        """The lane of `among` with the best rate at `load` (ties to the earlier lane)."""
        return max(among, key=lambda i: (self.rate(lanes[i], i, load, want), -i))

    def turn(self, lanes: list[Lane], ready: list[int], want: Want, load: int) -> int:
        """The lane (of `ready`) whose turn it is for `want` at `load`."""
        busy = [i for i, lane in enumerate(lanes) if lane.running > 0]
        if not busy:  # nothing runs: decided afresh
            if load <= 1:
                self._turn = self.alone(ready, want)
            else:
                self._turn = self._fastest(lanes, ready, load, want)
            return self._turn
        current = self._turn if self._turn in ready else next((i for i in busy if i in ready), None)
        if current is None:  # only an engine that is not ready runs: the best of the others
            return self._fastest(lanes, ready, load, want)
        best = self._fastest(lanes, ready, load, want)
        mine = self.rate(lanes[current], current, load, want)
        better = self.rate(lanes[best], best, load, want) > SWITCH_MARGIN * mine
        self._turn = best if better else current
        return self._turn

    def choose(
        self, lanes: list[Lane], ready: list[int], want: Want, load: int, waited_s: float = 0.0
    ) -> int | None:
        """The lane that takes `want` now, having waited `waited_s`, or None: it waits (its
        engine is full, until `spill_wait_s`; another engine must drain before its turn, until
        `turn_wait_s`)."""
        if not want.turns:
            return _aside(lanes, ready)
        lane = self.turn(lanes, ready, want, load)
        if lanes[lane].running >= lanes[lane].max_running:
            if waited_s < self.spill_wait_s:
                return None
            # Waited long enough: any engine with a free slot (capacity is their sum).
            spare = [i for i in ready if lanes[i].running < lanes[i].max_running]
            if not spare:
                return None
            return self._fastest(lanes, spare, load, want)
        draining = any(other.running > 0 for i, other in enumerate(lanes) if i != lane)
        if draining and waited_s < self.turn_wait_s:
            return None
        return lane


def _aside(lanes: list[Lane], ready: list[int]) -> int | None:
    """The lane for a request outside the turns (`Want.turns`: tokenize): a ready engine with
    room, one already at work first (the others may be resting), whose turn it is unchanged."""
    free = [i for i in ready if lanes[i].running < lanes[i].max_running]
    busy = [i for i in free if lanes[i].running > 0]
    return next(iter(busy or free), None)


def _output(want: Want) -> int:
    """The output tokens `want` is taken to produce: its limit, else a typical chat answer."""
    return want.output_tokens or DEFAULT_OUTPUT_TOKENS


def want_of(
    payload: Mapping[str, object],
    body_bytes: int,
    lanes: frozenset[int] | None,
    *,
    turns: bool = True,
) -> Want:
    """A request's size for the choice: its prompt estimated from the body's size, its output
    from the limit it asks for; `turns`: whether it takes part in the engines' turns."""
    output = 0
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            output = value
            break
    return Want(lanes, body_bytes // BYTES_PER_TOKEN, output, turns)
