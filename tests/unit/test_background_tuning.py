"""The benchmark's plan, and background tuning's rule: steps only while no request runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferd.bench import tune
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
