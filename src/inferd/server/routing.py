"""Which engine takes a request, for a model served by several (a combined profile).

The engines share the machine's cores, so the model of the machine is one of turns: every
engine with requests running does one decoding step in turn, a step of engine e with n requests
taking `step_e(n)` (measured: `inferd tune`, or the catalog's reference figures). Every running
request then gets one token per round of `R = sum of step_e(n_e)`, and the machine's output
rate is `(requests running) / R`. For the load there will be once a request joins (N requests),
the best split of N between the engines is the one with the shortest round `R*`; measured on a
2-core EPYC: one or two requests on llama.cpp (7.5 and 16.5 ms a step, against vLLM's 20), three
and more all on vLLM (20 ms for 3, 26 for 16, where llama.cpp takes 22 for 3).

A request goes to the engine with the smallest

    prompt_e(prompt tokens) + output tokens * round

where the round is `R*` on the engine the best split adds it to (the others drain towards the
split as their requests end), and the round it would make on any other engine (held away from
the best split for as long as it runs). So one user goes to llama.cpp; a crowd goes to vLLM's
batches and llama.cpp drains, rather than two engines fighting over the cores; a prompt-heavy
request with few output tokens goes where prompts are fastest; and an engine that is full or not
ready is not offered (admission offers only lanes with a free slot and a ready engine).

Only the choice is made here; `admission.Admission` keeps the slots and the queue, and calls
`Router.choose` with the lanes that have a free slot and a ready engine.
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
    """Picks, among a model's engines with a free slot, the one that finishes a request
    soonest (see the module's docstring). `speeds`: one per lane, in lane order."""

    def __init__(self, speeds: Sequence[Speed]) -> None:
        self.speeds = list(speeds)

    def _step(self, lane: int, running: int) -> float:
        return self.speeds[lane].step_time(running) if running > 0 else 0.0

    def round(self, counts: Sequence[int]) -> float:
        """Milliseconds of one round with `counts[i]` requests on lane i."""
        return sum(self._step(i, n) for i, n in enumerate(counts))

    def best_split(self, lanes: list[Lane], total: int) -> list[int]:
        """The requests per lane that make the shortest round for `total` requests, the lanes'
        slots allowing (ties: more on the earlier lanes). Two lanes (llama.cpp and vLLM): every
        split is tried; more: filled a request at a time where it lengthens the round least."""
        caps = [lane.max_running for lane in lanes]
        total = min(total, sum(caps))
        if len(lanes) == 2:
            splits = [
                [k, total - k] for k in range(min(total, caps[0]), -1, -1) if total - k <= caps[1]
            ]
            return min(splits, key=self.round)  # the first of equals: most on lane 0
        counts = [0] * len(lanes)
        for _ in range(total):
            room = [i for i in range(len(lanes)) if counts[i] < caps[i]]
            nxt = min(room, key=lambda i: self._step(i, counts[i] + 1) - self._step(i, counts[i]))
            counts[nxt] += 1
        return counts

    def cost(self, lane: int, lanes: list[Lane], want: Want, target: int | None = None) -> float:
        """The milliseconds `want` takes on lane `lane`: its prompt, then its output tokens
        at the round it will see (see the module's docstring)."""
        output = want.output_tokens or DEFAULT_OUTPUT_TOKENS
        counts = [lane_.running for lane_ in lanes]
        if target is None:
            target = self._target(lanes, counts)
        if lane == target:
            split = self.best_split(lanes, sum(counts) + 1)
            per_token = self.round(split)
        else:
            counts[lane] += 1
            per_token = self.round(counts)
        return self.speeds[lane].prompt_time(want.prompt_tokens) + output * per_token

    def _target(self, lanes: list[Lane], counts: list[int]) -> int:
        """The lane the best split for one more request adds it to: the first lane below its
        share of that split."""
        split = self.best_split(lanes, sum(counts) + 1)
        short = [i for i, n in enumerate(counts) if n < split[i]]
        return short[0] if short else 0

    def choose(self, lanes: list[Lane], free: list[int], want: Want) -> int:
        target = self._target(lanes, [lane.running for lane in lanes])
        # Ties go to the earlier lane (the engine that starts first).
        return min(free, key=lambda i: (self.cost(i, lanes, want, target), i))


def want_of(payload: Mapping[str, object], body_bytes: int, lanes: frozenset[int] | None) -> Want:
    """A request's size for the choice: its prompt estimated from the body's size, its output
    from the limit it asks for."""
    output = 0
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            output = value
            break
    return Want(lanes, body_bytes // BYTES_PER_TOKEN, output)
