"""The benchmark's plan, and background tuning's rule: steps only while no request runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import pytest

from inferd.bench import tune
from inferd.catalog import measured
from inferd.config import Settings
from inferd.server import tuning


def test_the_plan_is_capped_by_the_profiles_limit_and_context() -> None:
    plan = tune.steps(max_running=4, context=8192)
    assert [s.describe() for s in plan] == [
        "warm-up",
        "prompt 32 tokens",
        "prompt 128 tokens",
        "prompt 512 tokens",
        "prompt 1024 tokens",
        "1 running",
        "2 running",
        "4 running",
    ]
    short = tune.steps(max_running=32, context=512)
    assert [s.size for s in short if s.kind == "prompt"] == [32, 128]
    assert [s.size for s in short if s.kind == "decode"] == [1, 2, 4, 8, 16, 32]


def test_every_prompt_is_new_from_its_first_token() -> None:
    """So no prefix cache answers a measured prompt from an earlier one."""
    prompts = [tune.prompt_ids(128, seed) for seed in range(50)]
    assert all(len(p) == 128 for p in prompts)
    assert len({p[0] for p in prompts}) == 50
    assert all(tune.LOW_ID <= t < tune.HIGH_ID for p in prompts for t in p)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "QUIET_S", 0.0)
    monkeypatch.setattr(tuning, "POLL_S", 0.001)


async def test_a_step_a_request_interrupts_is_thrown_away_and_run_again(
    quick: None, tmp_path: Path
) -> None:
    busy = False
    tuner = tuning.Tuner([], Settings(cache_path=tmp_path), idle=lambda: not busy)
    tries = [asyncio.Event(), asyncio.Event()]  # set as each try starts
    cancelled, release = asyncio.Event(), asyncio.Event()

    async def step() -> int:
        number = sum(t.is_set() for t in tries)
        tries[number].set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return number + 1

    run = asyncio.create_task(tuner.gate(step))
    await asyncio.wait_for(tries[0].wait(), 5)
    busy = True  # a request arrives while the first try runs
    await asyncio.wait_for(cancelled.wait(), 5)
    assert not run.done()
    busy = False
    await asyncio.wait_for(tries[1].wait(), 5)
    release.set()
    assert await asyncio.wait_for(run, 5) == 2  # the second try's result
    assert tuner.thrown_away == 1


async def test_no_step_starts_while_requests_run(quick: None, tmp_path: Path) -> None:
    busy = True
    tuner = tuning.Tuner([], Settings(cache_path=tmp_path), idle=lambda: not busy)
    ran = asyncio.Event()

    async def step() -> None:
        ran.set()

    run = asyncio.create_task(tuner.gate(step))
    for _ in range(20):
        await asyncio.sleep(0.001)
    assert not ran.is_set()
    busy = False
    await run
    assert ran.is_set() and tuner.thrown_away == 0


def test_background_tuning_is_a_setting(tmp_path: Path) -> None:
    off = Settings(cache_path=tmp_path, tune_in_background=False)
    assert tuning.background([], off, idle=lambda: True) is None


async def test_stopping_the_tuner_ends_the_step_it_runs(quick: None, tmp_path: Path) -> None:
    """At shutdown the step must end with the tuner, before its engine is stopped under it."""
    tuner = tuning.Tuner([], Settings(cache_path=tmp_path), idle=lambda: True)
    running, ended = asyncio.Event(), asyncio.Event()

    async def step() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    task = asyncio.create_task(tuner.gate(step))
    await asyncio.wait_for(running.wait(), 5)
    await tuning.stop(task)
    assert ended.is_set() and task.cancelled()


def _figures(profile: str, prompt128: float, step1: float) -> measured.Measurement:
    return measured.Measurement(
        model="m",
        profile=profile,
        engine="llamacpp",
        fingerprint="f" * 12,
        prompt_ms={32: prompt128 / 3, 128: prompt128, 512: prompt128 * 4},
        step_ms={1: step1, 4: step1 * 3},
        ready_s=1.0,
        measured_at="2026-12-03T00:00:00+00:00",
    )


def test_a_turn_measures_what_the_ranking_reads() -> None:
    assert [s.describe() for s in tune.turn(4, 8192)] == [
        "warm-up",
        "prompt 128 tokens",
        "prompt 512 tokens",
        "1 running",
        "4 running",
    ]
    assert [s.describe() for s in tune.turn(1, 256)] == [
        "warm-up",
        "prompt 128 tokens",
        "1 running",
    ]


def test_contenders_are_the_profiles_close_to_the_fastest_for_one_user() -> None:
    # One user's 128/128: 400 + 127 * 11.7 = 1886 ms; 520 + 127 * 11.7 = 2006; 3000 + 1270.
    q8 = _figures("q8", 400, 11.7)
    q4 = _figures("q4", 520, 11.7)
    slow = _figures("slow", 3000, 10.0)
    assert tune.contenders({"q4": q4, "q8": q8, "slow": slow}) == ["q8", "q4"]
    assert tune.contenders({"q8": q8, "slow": slow}) == []  # nobody close: nothing to redo
    assert tune.contenders({"q8": q8}) == []


def test_merged_keeps_the_median_of_the_first_run_and_the_turns() -> None:
    first = _figures("q8", 417, 14.1)  # a slow spell during the first run's step
    turns = [
        replace(t, prompt_ms={128: t.prompt_ms[128], 512: t.prompt_ms[512]})
        for t in (_figures("q8", 300, 11.6), _figures("q8", 310, 11.8), _figures("q8", 290, 11.7))
    ]
    out = tune.merged(first, turns)
    assert out.prompt_ms[128] == 305 and out.step_ms[1] == pytest.approx(11.75)
    assert out.prompt_ms[512] == 1220 and out.step_ms[4] == pytest.approx(35.25)
    assert out.prompt_ms[32] == first.prompt_ms[32]  # not measured in the turns: kept


async def test_in_turns_measures_the_contenders_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    started: list[str] = []

    def start(pid: str) -> Callable[[], AbstractAsyncContextManager[tune.Started]]:
        @contextlib.asynccontextmanager
        async def engine() -> AsyncIterator[tune.Started]:
            started.append(pid)
            yield tune.Started(tune.Endpoint(Path(pid), {}, "m"), 1.0)

        return engine

    async def measure(
        endpoint: tune.Endpoint, plan: list[tune.Step], **_: object
    ) -> tuple[dict[int, float], dict[int, float]]:
        assert plan == tune.turn(4, 8192)
        order.append(str(endpoint.socket))
        q8 = endpoint.socket == Path("q8")
        return {128: 300.0 if q8 else 500.0, 512: 1400.0 if q8 else 2100.0}, {
            1: 11.7 if q8 else 11.6,
            4: 26.0,
        }

    monkeypatch.setattr(tune, "measure", measure)
    first = {"q8": _figures("q8", 417, 14.1), "q4": _figures("q4", 520, 11.67)}
    plans = {p: tune.turn(4, 8192) for p in first}
    out = await tune.in_turns({p: start(p) for p in first}, first, plans, rounds=3)
    assert order == ["q8", "q4"] * 3 and started == order  # restarted for every turn
    assert out["q8"].step_ms[1] == pytest.approx(11.7) and out["q4"].step_ms[1] == 11.6
    # With the turns, q8_0 is the faster for one user, as serving it showed.
    assert out["q8"].single_user_ms() < out["q4"].single_user_ms()
