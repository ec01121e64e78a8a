"""Which engine takes a request, for a model served by several (a combined profile).

The engines share the machine's cores, so the model of the machine is one of turns: every
engine with requests running does one decoding step in turn, a step of engine e with n requests
taking `step_e(n)` (measured: `inferd tune`, or the catalog's reference figures). Every running
request then gets one token per round of `R = sum of step_e(n_e)`. A new request that joins
engine e lengthens the round by `step_e(n_e + 1) - step_e(n_e)`, for itself and for everyone
else, and waits `prompt_e(tokens)` for its first token. So the engine that finishes it soonest
(R is the same whichever engine takes it) is the one with the smallest

    prompt_e(prompt tokens) + output tokens * (step_e(n_e + 1) - step_e(n_e))

which is also the choice that slows everyone else least. What it gives: one user goes to
the engine with the fastest single stream (llama.cpp on CPUs); more users fill it while a
request there costs the round less than one on the other engine; past that (in practice: once
it is full), requests go to the engine whose steps grow slowest with more requests (vLLM's
batches), and the first engine drains, so a crowd gets the batching engine's throughput rather
than two engines fighting over the cores. Prompt-heavy requests with few output tokens go where
prompts are fastest.

Starting an idle engine costs a whole step, which keeps requests on the engine already running
them: on purpose. Measured on the 2-core EPYC, the two engines busy at once are much slower
than the sum of their steps (2 requests on each: 8.5 s for 128 tokens where the sum of steps
says 4.7, and 2.6 on vLLM alone), so a rule that moved a small load to vLLM early (the best
split of the load: vLLM from three requests on) gave four users 42-64 tok/s where llama.cpp
alone gives 130 and vLLM alone 206 (benchmarks/RESULTS.md).

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

    def cost(self, lane: int, running: int, want: Want) -> float:
        """The milliseconds `want` adds on lane `lane` running `running` requests: its prompt,
        and its output tokens times the longer round."""
        speed = self.speeds[lane]
        output = want.output_tokens or DEFAULT_OUTPUT_TOKENS
        # An idle engine adds a whole step to the round; a busy one what one more request adds.
        before = speed.step_time(running) if running > 0 else 0.0
        step = max(0.0, speed.step_time(running + 1) - before)
        return speed.prompt_time(want.prompt_tokens) + output * step

    def choose(self, lanes: list[Lane], free: list[int], want: Want) -> int:
        # Ties go to the earlier lane (the engine that starts first).
        return min(free, key=lambda i: (self.cost(i, lanes[i].running, want), i))


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
