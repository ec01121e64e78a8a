"""The choice between a combined profile's engines, and admission's lanes (no engines run)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge

from inferd.errors import OverloadedError
from inferd.server.admission import Admission, Lane, Limits, Want
from inferd.server.routing import DEFAULT_OUTPUT_TOKENS, Router, Table, want_of

# Measured by `inferd tune` on a quiet 2-core EPYC (the catalog's reference figures of
# smollm2-135m-instruct): llama.cpp fast alone, its steps growing steeply; vLLM slower alone,
# its steps nearly flat.
LLAMA = Table({32: 91, 128: 155, 512: 643, 1024: 1475}, {1: 7.5, 2: 16.5, 4: 27.1})
VLLM = Table(
    {32: 36, 128: 64, 512: 196, 1024: 431},
    {1: 20.0, 2: 19.9, 4: 20.0, 8: 21.5, 16: 25.8, 32: 34.2},
)


def _lanes(llama: int = 0, vllm: int = 0) -> list[Lane]:
    return [Lane("llamacpp", 4, running=llama), Lane("vllm", 32, running=vllm)]


def test_tables_interpolate_and_extend() -> None:
    assert LLAMA.step_time(3) == pytest.approx(21.8)
    assert LLAMA.step_time(6) == pytest.approx(37.7)  # past the last point, along the last line
    assert LLAMA.step_time(0) == 0.0
    assert VLLM.prompt_time(320) == pytest.approx(130.0)


def test_one_user_goes_to_the_fastest_single_stream() -> None:
    router = Router([LLAMA, VLLM])
    assert router.choose(_lanes(), [0, 1], Want(None, 128, 128)) == 0


def test_users_stay_on_the_running_engine_until_it_is_full() -> None:
    router = Router([LLAMA, VLLM])
    # Starting vLLM adds a whole 20 ms step; one more on llama.cpp 9, 5.3, 5.3 ms.
    for running in (1, 2, 3):
        assert router.choose(_lanes(llama=running), [0, 1], Want(None, 128, 128)) == 0
    assert router.choose(_lanes(llama=4), [1], Want(None, 128, 128)) == 1  # full: spill


def test_a_crowd_drains_the_first_engine() -> None:
    router = Router([LLAMA, VLLM])
    # vLLM busy: one more request there costs its round 0.3 ms, one more on llama.cpp 5.3.
    assert router.choose(_lanes(llama=3, vllm=12), [0, 1], Want(None, 128, 128)) == 1
    # Even once llama.cpp is empty: starting it adds a whole step to everyone's round.
    assert router.choose(_lanes(llama=0, vllm=15), [0, 1], Want(None, 128, 128)) == 1
    # After the crowd, one user alone: llama.cpp again.
    assert router.choose(_lanes(), [0, 1], Want(None, 128, 128)) == 0


def test_a_prompt_heavy_request_goes_where_prompts_are_fastest() -> None:
    router = Router([LLAMA, VLLM])
    assert router.choose(_lanes(), [0, 1], Want(None, 1024, 1)) == 1
    assert router.choose(_lanes(), [0, 1], Want(None, 1024, 256)) == 0


def test_want_reads_the_output_limit_and_estimates_the_prompt() -> None:
    want = want_of({"max_completion_tokens": 12, "max_tokens": 99}, 400, frozenset({1}))
    assert (want.prompt_tokens, want.output_tokens, want.lanes) == (100, 12, frozenset({1}))
    assert want_of({"max_tokens": True}, 8, None).output_tokens == 0
    assert Router([LLAMA]).cost(0, 0, Want()) == pytest.approx(
        LLAMA.prompt_time(0) + DEFAULT_OUTPUT_TOKENS * 7.5
    )


def _admission(lanes: list[Lane], queue: int = 4, timeout: float = 5.0) -> Admission:
    registry = CollectorRegistry()
    running = Gauge("running", "", ["model"], registry=registry)
    waiting = Gauge("waiting", "", ["model"], registry=registry)
    limits = Limits(sum(lane.max_running for lane in lanes), queue, timeout)
    return Admission(
        "m", limits, running, waiting, lanes=lanes, choose=Router([LLAMA, VLLM]).choose
    )


async def test_capacity_is_the_sum_of_the_lanes_and_the_queue_comes_after() -> None:
    lanes = [Lane("llamacpp", 1), Lane("vllm", 2)]
    admission = _admission(lanes, queue=1, timeout=5)
    slots = [await admission.acquire(Want(None, 128, 128)) for _ in range(3)]
    assert [s.lane for s in slots] == [0, 1, 1]
    waiter = asyncio.create_task(admission.acquire(Want(None, 128, 128)))
    await asyncio.sleep(0)
    assert admission.waiting == 1
    with pytest.raises(OverloadedError):
        await admission.acquire()
    slots[1].release()  # a vLLM slot frees: the waiter gets it
    assert (await waiter).lane == 1
    assert [lane.running for lane in lanes] == [1, 2] and admission.running == 3


async def test_a_request_only_one_engine_serves_waits_for_that_engine() -> None:
    lanes = [Lane("llamacpp", 1), Lane("vllm", 1)]
    admission = _admission(lanes)
    vllm_only = Want(frozenset({1}), 8, 8)
    first = await admission.acquire(vllm_only)
    assert first.lane == 1
    waiter = asyncio.create_task(admission.acquire(vllm_only))
    await asyncio.sleep(0)
    # The llama.cpp lane is free and the waiter cannot use it: a new request takes it at once.
    other = await admission.acquire(Want(None, 8, 8))
    assert other.lane == 0
    other.release()  # nobody waiting can use it: it stays free
    assert not waiter.done() and lanes[0].running == 0
    first.release()
    assert (await waiter).lane == 1


async def test_an_engine_that_becomes_ready_takes_the_waiters() -> None:
    ready = {"vllm": False}
    lanes = [Lane("llamacpp", 1), Lane("vllm", 4, usable=lambda: ready["vllm"])]
    admission = _admission(lanes)
    held = await admission.acquire()
    assert held.lane == 0
    waiters = [asyncio.create_task(admission.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert admission.waiting == 2
    ready["vllm"] = True
    admission.wake()
    assert [(await w).lane for w in waiters] == [1, 1]
    assert lanes[1].taken == 2 and admission.waiting == 0


async def test_no_lane_can_serve_it_is_refused() -> None:
    admission = _admission([Lane("llamacpp", 1), Lane("vllm", 1)])
    with pytest.raises(OverloadedError, match="no engine"):
        await admission.acquire(Want(frozenset(), 8, 8))
