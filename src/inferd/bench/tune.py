"""The short fixed benchmark of one profile on this machine (`inferd tune`, background tuning).

What the ranking and the router need is the engine's own speed, without inferd's front: so the
profile's engine is started afresh and driven directly over its Unix socket with its per-start
key, as the front itself talks to it. Starting it is the caller's (`start`: an async context
manager that yields a `Started` engine and stops it on exit): `server.tuning.started` does it
with inferd's own `Supervisor` in this process, so the engine runs exactly as `serve` runs it
(same command, socket, key, readiness check) and no `inferd serve` child, port or front has to
be started and measured around it. This module imports nothing of the server (bench measures
from the outside); `server.tuning` and `cli.tune_cmd` put the two together.

The benchmark, in `Step`s:
- prompt time at 32, 128, 512 and 1024 tokens (those that fit the context): one request alone,
  `max_tokens` 1, the median of 3, each prompt new (no prefix cache can answer it);
- step time at 1, 2, 4, 8, 16 and 32 requests at once, up to the profile's `max_running`: that
  many streams of 48 tokens (`ignore_eos`), the median gap between tokens after each stream's
  first few (which overlap the others' prompts); one stream alone three times, the median.
Prompts are token ids (both engines take them), so their length is exact for any tokenizer.

Profiles are measured one after another, so a slow spell of the machine (a neighbour's work on a
shared host) can fall on one and not the other: on a 2-core Zen 3 one profile's step measured
14.1 ms where serving it showed 11.7, and the ranking picked the slower profile. So where
profiles come close for one user (`contenders`: within `CLOSE` of the best), `in_turns` measures
what the ranking reads again in turns (A, B, A, B, ...: each restarted, warmed up, its prompt
and step for one user and for four, `turn`), and each keeps the median of its runs (`merged`):
a slow spell then costs every contender alike.
`gate` runs each step: the background tuner uses it to run steps only while no request is being
served, and to throw away and redo a step a request interrupted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import aiohttp

from inferd.catalog.measured import CROWD, TYPICAL_PROMPT, Measurement
from inferd.errors import InferdError

PROMPT_TOKENS = (32, 128, 512, 1024)
RUNNING = (1, 2, 4, 8, 16, 32)
ROUNDS = 3
OUTPUT_TOKENS = 48
# Gaps of each stream's first tokens are dropped: the streams start together, so those tokens
# wait for the other streams' prompts and are no decoding step.
SKIP_GAPS = 4
DECODE_PROMPT = 32
# Token ids of prompts: past the special tokens vocabularies put first, and below 32,000 so
# every vocabulary has them (Qwen's and Llama's put their special tokens at the end).
LOW_ID, HIGH_ID = 100, 32_000
REQUEST_TIMEOUT_S = 300.0
# Profiles whose one-user time is within this factor of the best are measured again in turns
# (a slow spell made one 25% slower than it serves: 2.07 against 1.65 s, on a 2-core Zen 3).
CLOSE = 1.5
TURNS = 3  # rounds of measuring the contenders in turns

# Runs one step (returns what the step returns); the default runs it at once.
Gate = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    """A started engine: its socket, the headers its key needs, the model name it serves."""

    socket: Path
    headers: Mapping[str, str]
    model: str


@dataclass(frozen=True)
class Started:
    endpoint: Endpoint
    ready_s: float  # engine start to ready


@dataclass(frozen=True)
class Step:
    kind: Literal["warm-up", "prompt", "decode"]
    size: int  # prompt tokens, or requests at once

    def describe(self) -> str:
        if self.kind == "prompt":
            return f"prompt {self.size} tokens"
        if self.kind == "decode":
            return f"{self.size} running"
        return "warm-up"


def steps(max_running: int, context: int) -> list[Step]:
    """The benchmark of a profile with this `max_running` and context, in order."""
    prompts = [n for n in PROMPT_TOKENS if n + 2 <= context]
    running = [n for n in RUNNING if n <= max_running]
    return [
        Step("warm-up", 1),
        *(Step("prompt", n) for n in prompts),
        *(Step("decode", n) for n in running),
    ]


def prompt_ids(tokens: int, seed: int) -> list[int]:
    """`tokens` ids, different for every `seed` from the first one on."""
    span = HIGH_ID - LOW_ID
    return [LOW_ID + (seed * 7_919 + i * 104_729) % span for i in range(tokens)]


class Driver:
    """Requests to one engine over its socket; every prompt new (a counter seeds them)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._seed = 0
        # A new connection per request (cheap on a Unix socket): engines close kept-alive
        # connections on their own schedule, and a request on one just closed would fail.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(endpoint.socket), limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )

    async def close(self) -> None:
        await self.session.close()

    def _body(self, tokens: int, max_tokens: int, *, stream: bool) -> dict[str, Any]:
        self._seed += 1
        return {
            "model": self.endpoint.model,
            "prompt": prompt_ids(tokens, self._seed),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }

    async def first_token_ms(self, tokens: int) -> float:
        """One request alone: prompt of `tokens`, one output token; wall time in ms."""
        body = self._body(tokens, 1, stream=False)
        began = time.perf_counter()
        async with self.session.post(
            "http://engine/v1/completions", json=body, headers=dict(self.endpoint.headers)
        ) as resp:
            answer = await resp.read()
            if resp.status != 200:
                raise InferdError(f"the engine answered {resp.status}: {answer[:200]!r}")
        return (time.perf_counter() - began) * 1000

    async def token_times(self, max_tokens: int) -> list[float]:
        """One stream: when each of its token events arrived (perf_counter seconds)."""
        body = self._body(DECODE_PROMPT, max_tokens, stream=True)
        times: list[float] = []
        async with self.session.post(
            "http://engine/v1/completions", json=body, headers=dict(self.endpoint.headers)
        ) as resp:
            if resp.status != 200:
                raise InferdError(f"the engine answered {resp.status}: {await resp.read()!r}")
            async for line in resp.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                with_choice = _has_choice(line[5:])
                if with_choice:
                    times.append(time.perf_counter())
        return times


def _has_choice(data: bytes) -> bool:
    try:
        event = json.loads(data)
    except ValueError:
        return False
    return isinstance(event, dict) and bool(event.get("choices"))


async def step_ms(driver: Driver, running: int) -> float:
    """Median time between tokens with `running` streams at once (one stream alone: the median
    of `ROUNDS` streams, each a fraction of a second, which a hiccup could fill)."""
    if running == 1:
        return statistics.median([await _gaps_ms(driver, 1) for _ in range(ROUNDS)])
    return await _gaps_ms(driver, running)


async def _gaps_ms(driver: Driver, running: int) -> float:
    streams = await asyncio.gather(*(driver.token_times(OUTPUT_TOKENS) for _ in range(running)))
    gaps = [
        (later - earlier) * 1000
        for times in streams
        for earlier, later in zip(times[SKIP_GAPS:], times[SKIP_GAPS + 1 :], strict=False)
    ]
    if not gaps:
        raise InferdError(f"the engine streamed too few tokens at {running} running")
    return statistics.median(gaps)


async def prompt_ms(driver: Driver, tokens: int) -> float:
    return statistics.median([await driver.first_token_ms(tokens) for _ in range(ROUNDS)])


async def at_once(run: Callable[[], Awaitable[Any]]) -> Any:
    """The gate that runs each step at once (`inferd tune`'s)."""
    return await run()


async def measure(
    endpoint: Endpoint,
    plan: list[Step],
    *,
    gate: Gate = at_once,
    advance: Callable[[Step], object] = lambda step: None,
) -> tuple[dict[int, float], dict[int, float]]:
    """Run `plan` against a started engine: (prompt ms by tokens, step ms by running)."""
    driver = Driver(endpoint)
    prompts: dict[int, float] = {}
    running: dict[int, float] = {}
    try:
        await _run(driver, plan, prompts, running, gate, advance)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise InferdError(f"the engine failed during the benchmark: {exc!r}") from None
    finally:
        await driver.close()
    return prompts, running


async def _run(
    driver: Driver,
    plan: list[Step],
    prompts: dict[int, float],
    running: dict[int, float],
    gate: Gate,
    advance: Callable[[Step], object],
) -> None:
    for step in plan:
        if step.kind == "warm-up":
            await gate(partial(driver.token_times, 8))
        elif step.kind == "prompt":
            prompts[step.size] = await gate(partial(prompt_ms, driver, step.size))
        else:
            running[step.size] = await gate(partial(step_ms, driver, step.size))
        advance(step)


async def tune(
    start: Callable[[], AbstractAsyncContextManager[Started]],
    *,
    model: str,
    profile: str,
    engine: str,
    fingerprint: str,
    plan: list[Step],
    gate: Gate = at_once,
    advance: Callable[[Step], object] = lambda step: None,
) -> Measurement:
    """Start the engine (through `start`), measure `plan`, stop it: the profile's figures."""
    async with start() as started:
        prompts, running = await measure(started.endpoint, plan, gate=gate, advance=advance)
    return Measurement(
        model=model,
        profile=profile,
        engine=engine,
        fingerprint=fingerprint,
        prompt_ms=prompts,
        step_ms=running,
        ready_s=started.ready_s,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def turn(max_running: int, context: int) -> list[Step]:
    """The steps of one turn: what the ranking reads (`catalog.profiles`): one user's prompt and
    step, and `CROWD` users' together (their prompts as one batch, their step)."""
    crowd = min(CROWD, max_running)
    prompts = [
        n for n in dict.fromkeys((TYPICAL_PROMPT, crowd * TYPICAL_PROMPT)) if n + 2 <= context
    ]
    return [
        Step("warm-up", 1),
        *(Step("prompt", n) for n in prompts),
        *(Step("decode", n) for n in dict.fromkeys((1, crowd))),
    ]


def contenders(measurements: Mapping[str, Measurement], close: float = CLOSE) -> list[str]:
    """The profiles within `close` of the fastest for one user (none when fewer than two)."""
    if len(measurements) < 2:
        return []
    times = {pid: m.single_user_ms() for pid, m in measurements.items()}
    best = min(times.values())
    near = [pid for pid, t in sorted(times.items(), key=lambda kv: kv[1]) if t <= best * close]
    return near if len(near) >= 2 else []


def merged(m: Measurement, turns: list[Measurement]) -> Measurement:
    """`m` with each point its turns measured the median of its own and theirs."""
    prompts, steps = dict(m.prompt_ms), dict(m.step_ms)
    for n in {n for t in turns for n in t.prompt_ms}:
        prompts[n] = statistics.median([m.prompt_time(n), *(t.prompt_ms[n] for t in turns)])
    for n in {n for t in turns for n in t.step_ms}:
        steps[n] = statistics.median([m.step_time(n), *(t.step_ms[n] for t in turns)])
    return replace(m, prompt_ms=prompts, step_ms=steps)


async def in_turns(
    starts: Mapping[str, Callable[[], AbstractAsyncContextManager[Started]]],
    measurements: Mapping[str, Measurement],
    plans: Mapping[str, list[Step]],
    *,
    rounds: int = TURNS,
    gate: Gate = at_once,
    advance: Callable[[str], object] = lambda profile: None,
) -> dict[str, Measurement]:
    """The profiles of `starts` measured again in turns, `rounds` times each (each its `plans`
    entry: `turn`), their `measurements` `merged` with what the turns found."""
    found: dict[str, list[Measurement]] = {pid: [] for pid in starts}
    for _ in range(rounds):
        for pid, start in starts.items():
            m = measurements[pid]
            found[pid].append(
                await tune(
                    start,
                    model=m.model,
                    profile=pid,
                    engine=m.engine,
                    fingerprint=m.fingerprint,
                    plan=plans[pid],
                    gate=gate,
                )
            )
            advance(pid)
    return {pid: merged(measurements[pid], turns) for pid, turns in found.items()}
