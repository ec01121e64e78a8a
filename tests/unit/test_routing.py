"""The choice between a combined profile's engines, and admission's lanes (no engines run)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client import CollectorRegistry, Gauge

from inferd.errors import OverloadedError
from inferd.server import admission as admission_module
from inferd.server import warmup
from inferd.server.admission import RETURN_S, Admission, Lane, Limits, Slot, Want
from inferd.server.engine_client import EngineClient
from inferd.server.proxy import LINGER_ASK_S, _linger
from inferd.server.routing import DEFAULT_OUTPUT_TOKENS, Router, Table, want_of
from inferd.server.served import ServedModel

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
    assert router.choose(_lanes(), [0, 1], Want(None, 128, 128), 1) == 0


def test_a_few_users_stay_on_llamacpp() -> None:
    router = Router([LLAMA, VLLM])
    # Rates at 2 and 3 requests of 128 in / 128 out: llama.cpp 0.106 and 0.118 tokens/ms,
    # vLLM 0.096 and 0.140 (not 1.25 times better): they join llama.cpp.
    for running in (1, 2):
        assert router.choose(_lanes(llama=running), [0, 1], Want(None, 128, 128), running + 1) == 0


def test_four_users_end_llamacpps_turn_and_wait_for_its_drain() -> None:
    router = Router([LLAMA, VLLM])
    # At four, vLLM's 0.182 beats 1.25 x llama.cpp's 0.125: the fourth waits, as do all
    # after it, until llama.cpp's three are done; then vLLM takes them all.
    assert router.turn(_lanes(llama=3), [0, 1], Want(None, 128, 128), 4) == 1
    assert router.choose(_lanes(llama=3), [0, 1], Want(None, 128, 128), 4) is None
    assert router.choose(_lanes(llama=1), [0, 1], Want(None, 128, 128), 8) is None
    assert router.choose(_lanes(), [0, 1], Want(None, 128, 128), 8) == 1


def test_a_crowd_stays_on_vllm_until_one_user_is_left() -> None:
    router = Router([LLAMA, VLLM])
    assert router.choose(_lanes(vllm=15), [0, 1], Want(None, 128, 128), 16) == 1
    # Two left: llama.cpp's 0.106 is not 1.25 x vLLM's 0.096: vLLM keeps its turn.
    assert router.choose(_lanes(vllm=1), [0, 1], Want(None, 128, 128), 2) == 1
    # One alone: llama.cpp again.
    assert router.choose(_lanes(), [0, 1], Want(None, 128, 128), 1) == 0


def test_the_prompts_count_in_an_engines_rate() -> None:
    # `inferd tune` on another 2-core Zen 4 (2026-12-04), where vLLM's serving benchmark gave
    # four users of 128 in / 128 out 192 tok/s and llama.cpp 140: the steps alone (22.9 and
    # 19.9 ms) make vLLM 1.15 times faster, short of the margin; with each newcomer's prompt
    # holding up the others' steps (147 and 55 ms), 1.27: the fourth user moves to vLLM.
    llama = Table({32: 44, 128: 147, 512: 611, 1024: 1264}, {1: 6.1, 2: 13.7, 4: 22.9})
    vllm = Table(
        {32: 37, 128: 55, 512: 173, 1024: 363},
        {1: 14.5, 2: 18.0, 4: 19.9, 8: 23.9, 16: 28.0, 32: 31.9},
    )
    router = Router([llama, vllm])
    want = Want(None, 128, 128)
    assert router.rate(_lanes()[1], 1, 4, want) / router.rate(_lanes()[0], 0, 4, want) > 1.25
    assert router.turn(_lanes(llama=3), [0, 1], want, 4) == 1
    # Three users stay (a router that has not changed turns): 0.138 against vLLM's 0.148.
    assert Router([llama, vllm]).turn(_lanes(llama=2), [0, 1], want, 3) == 0
    # Short prompts and long answers weigh the steps: four such users stay on llama.cpp.
    assert Router([llama, vllm]).turn(_lanes(llama=3), [0, 1], Want(None, 8, 1024), 4) == 0


def test_a_change_of_turn_holds_while_the_old_engine_drains() -> None:
    router = Router([LLAMA, VLLM])
    want = Want(None, 128, 128)
    # Four users: the fourth ends llama.cpp's turn.
    assert router.choose(_lanes(llama=3), [0, 1], want, 4) is None
    # One of llama.cpp's three finishes: the load seen is three (its client has not sent the
    # next yet), where llama.cpp alone would keep its turn; the change holds.
    assert router.choose(_lanes(llama=2), [0, 1], want, 3) is None
    assert router.choose(_lanes(), [0, 1], want, 4) == 1
    # On vLLM, loads of three and two stay there; one user alone goes back to llama.cpp.
    assert router.choose(_lanes(vllm=2), [0, 1], want, 3) == 1
    assert router.choose(_lanes(vllm=1), [0, 1], want, 2) == 1
    assert router.choose(_lanes(), [0, 1], want, 1) == 0


def test_without_the_held_turn_four_users_would_never_move() -> None:
    # A fresh router that only sees the state after a finish keeps llama.cpp: the load of three.
    assert Router([LLAMA, VLLM]).choose(_lanes(llama=2), [0, 1], Want(None, 128, 128), 3) == 0


def test_a_full_engine_makes_its_requests_wait() -> None:
    router = Router([LLAMA, VLLM])
    # llama.cpp full and only it may serve (vLLM still starting: not ready): wait for a slot.
    assert router.choose(_lanes(llama=4), [0], Want(None, 128, 128), 5) is None
    # vLLM ready but llama.cpp still running: vLLM's turn waits for the drain.
    assert router.choose(_lanes(llama=4), [1], Want(frozenset({1}), 8, 8), 5) is None


def test_a_prompt_heavy_request_goes_where_prompts_are_fastest() -> None:
    router = Router([LLAMA, VLLM])
    assert router.choose(_lanes(), [0, 1], Want(None, 1024, 1), 1) == 1
    assert router.choose(_lanes(), [0, 1], Want(None, 1024, 256), 1) == 0


def test_want_reads_the_output_limit_and_estimates_the_prompt() -> None:
    want = want_of({"max_completion_tokens": 12, "max_tokens": 99}, 400, frozenset({1}))
    assert (want.prompt_tokens, want.output_tokens, want.lanes) == (100, 12, frozenset({1}))
    assert want_of({"max_tokens": True}, 8, None).output_tokens == 0
    assert Router([LLAMA]).cost(0, Want()) == pytest.approx(
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


async def test_the_queue_is_sized_from_both_engines_and_the_503_comes_after_it() -> None:
    lanes = [Lane("llamacpp", 1), Lane("vllm", 2)]
    admission = _admission(lanes, queue=1, timeout=5)
    first = await admission.acquire(Want(None, 128, 128))
    assert first.lane == 0  # alone: llama.cpp
    # Two: llama.cpp's one slot (0.133 tokens/ms) against vLLM's 0.101 at two: it stays
    # llama.cpp's turn, and the second waits for its slot.
    waiter = asyncio.create_task(admission.acquire(Want(None, 128, 128)))
    await asyncio.sleep(0)
    assert admission.waiting == 1
    with pytest.raises(OverloadedError, match="at capacity"):  # the queue of one is full
        await admission.acquire()
    first.release()
    assert (await waiter).lane == 0
    assert admission.running == 1 and admission.waiting == 0


async def test_waiters_keep_their_order_across_a_change_of_turn() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _admission(lanes, queue=16)
    want = Want(None, 128, 128)
    held = [await admission.acquire(want) for _ in range(3)]  # three users: llama.cpp
    assert [s.lane for s in held] == [0, 0, 0]
    order: list[int] = []

    async def take(i: int) -> int:
        slot = await admission.acquire(want)
        order.append(i)
        return slot.lane

    # A crowd arrives: vLLM's turn; none joins llama.cpp, though it has a free slot.
    crowd = [asyncio.create_task(take(i)) for i in range(8)]
    await asyncio.sleep(0)
    assert admission.waiting == 8 and lanes[0].running == 3
    for slot in held:
        slot.release()
    assert await asyncio.gather(*crowd) == [1] * 8
    assert order == list(range(8)) and lanes[1].running == 8


async def test_a_request_only_one_engine_serves_waits_for_that_engine() -> None:
    lanes = [Lane("llamacpp", 1), Lane("vllm", 1)]
    admission = _admission(lanes)
    llama = await admission.acquire(Want(None, 128, 128))
    assert llama.lane == 0
    vllm_only = asyncio.create_task(admission.acquire(Want(frozenset({1}), 8, 8)))
    await asyncio.sleep(0)
    # The vLLM lane is free, but llama.cpp runs: vLLM's turn comes when llama.cpp is done,
    # and a newcomer does not overtake the waiter.
    later = asyncio.create_task(admission.acquire(Want(None, 128, 128)))
    await asyncio.sleep(0)
    assert not vllm_only.done() and not later.done() and admission.waiting == 2
    llama.release()
    assert (await vllm_only).lane == 1
    await asyncio.sleep(0)
    assert not later.done()  # vLLM's one slot is taken, and it keeps its turn at load 2


async def test_an_engine_that_becomes_ready_takes_the_waiters() -> None:
    ready = {"vllm": False}
    lanes = [Lane("llamacpp", 1), Lane("vllm", 4, usable=lambda: ready["vllm"])]
    admission = _admission(lanes)
    held = await admission.acquire()
    assert held.lane == 0
    waiters = [asyncio.create_task(admission.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    assert admission.waiting == 4
    # vLLM ready: at five requests its turn (0.245 tokens/ms against llama.cpp's one slot at
    # 0.133); it starts once llama.cpp has drained.
    ready["vllm"] = True
    admission.wake()
    await asyncio.sleep(0)
    assert admission.waiting == 4
    held.release()
    assert [(await w).lane for w in waiters] == [1, 1, 1, 1]
    assert lanes[1].taken == 4 and admission.waiting == 0


async def test_no_lane_can_serve_it_is_refused() -> None:
    admission = _admission([Lane("llamacpp", 1), Lane("vllm", 1)])
    with pytest.raises(OverloadedError, match="no engine"):
        await admission.acquire(Want(frozenset(), 8, 8))


class _Later:
    """What `warmup.Yield` asks of a later engine's supervisor: pause and resume its start,
    and rest once ready while it has nothing to do."""

    def __init__(self) -> None:
        self.paused = False
        self.idle: bool | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def rest(self, idle: bool) -> None:
        self.idle = idle


async def test_a_starting_engine_yields_while_the_first_serves_and_runs_for_a_crowd() -> None:
    vllm_ready = {"now": False}
    lanes = [Lane("llamacpp", 1), Lane("vllm", 4, usable=lambda: vllm_ready["now"])]
    admission = _admission(lanes, queue=4)
    start = _Later()
    admission.watchers.append(warmup.Yield(admission, {1: start}))
    one = await admission.acquire()
    assert start.paused  # one user on llama.cpp: the start holds
    crowd = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    assert not start.paused  # someone waits: the start goes on
    one.release()
    second = await crowd
    assert start.paused  # the waiter runs alone again
    second.release()
    assert not start.paused  # idle: the start goes on


async def test_a_later_engine_rests_while_its_lane_has_nothing_to_do() -> None:
    lanes = [Lane("llamacpp", 1), Lane("vllm", 4)]
    admission = _admission(lanes, queue=4)
    later = _Later()
    admission.watchers.append(warmup.Yield(admission, {1: later}))
    first = await admission.acquire(Want(frozenset({0}), 8, 8))
    assert later.idle is True  # a request on llama.cpp: vLLM has nothing to do
    first.release()
    assert later.idle is True
    second = await admission.acquire(Want(frozenset({1}), 8, 8))
    assert second.lane == 1 and later.idle is False  # told before its request is sent
    second.release()
    assert later.idle is True


async def test_a_change_of_turn_waits_for_the_drain_only_so_long() -> None:
    registry = CollectorRegistry()
    running = Gauge("running", "", ["model"], registry=registry)
    waiting = Gauge("waiting", "", ["model"], registry=registry)
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    limits = Limits(36, 16, 5.0)
    router = Router([LLAMA, VLLM], queue_timeout_s=0.4)  # a change of turn waits 0.36 s
    admission = Admission(
        "m", limits, running, waiting, lanes=lanes, choose=router.choose, moments=router.moments
    )
    held = [await admission.acquire(Want(None, 128, 128)) for _ in range(3)]
    crowd = [asyncio.create_task(admission.acquire(Want(None, 128, 128))) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert admission.waiting == 5  # vLLM's turn, waiting for llama.cpp's three
    # llama.cpp does not drain in time (long answers, a busy machine): vLLM starts beside it.
    started = [(await w).lane for w in crowd]
    assert started == [1] * 5 and lanes[0].running == 3
    for slot in held:
        slot.release()


def test_a_waiter_out_of_patience_takes_any_free_slot() -> None:
    router = Router([LLAMA, VLLM])  # the queue's limit: 30 s
    # vLLM's turn and full, llama.cpp with room: patient, it waits; out of patience, llama.cpp.
    lanes = [Lane("llamacpp", 4, running=3), Lane("vllm", 32, running=32)]
    assert router.choose(lanes, [0, 1], Want(None, 128, 128), 38) is None
    # Past a change of turn's wait, still on its engine: moving would run both at once.
    assert router.choose(lanes, [0, 1], Want(None, 128, 128), 38, waited_s=20.0) is None
    assert router.choose(lanes, [0, 1], Want(None, 128, 128), 38, waited_s=27.0) == 0
    full = [Lane("llamacpp", 4, running=4), Lane("vllm", 32, running=32)]
    assert router.choose(full, [0, 1], Want(None, 128, 128), 38, waited_s=29.0) is None
    assert router.moments == (5.0, 27.0)
    # A short queue limit shortens both waits.
    assert Router([LLAMA, VLLM], queue_timeout_s=4.0).moments == (3.6, 3.6)


# Measured by `inferd tune` on a quiet 2-core Zen 3 (AVX2, no AVX512-BF16): vLLM's bf16 steps
# grow with every request, so llama.cpp is faster at every load.
LLAMA_ZEN3 = Table({32: 125, 128: 417, 512: 1735}, {1: 14.1, 2: 24.6, 4: 34.8})
VLLM_ZEN3 = Table(
    {32: 433, 128: 1511, 512: 6878},
    {1: 35.9, 2: 45.5, 4: 78.8, 8: 163.5, 16: 268.0, 32: 568.7},
)


async def test_a_crowd_the_faster_engine_serves_alone_waits_for_it() -> None:
    registry = CollectorRegistry()
    running = Gauge("running", "", ["model"], registry=registry)
    waiting = Gauge("waiting", "", ["model"], registry=registry)
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    router = Router([LLAMA_ZEN3, VLLM_ZEN3], queue_timeout_s=1.0)  # a full engine: 0.9 s
    admission = Admission(
        "m", Limits(36, 72, 2.0), running, waiting, lanes=lanes, choose=router.choose,
        moments=router.moments,
    )  # fmt: skip
    held = [await admission.acquire(Want(None, 128, 128)) for _ in range(4)]
    assert [slot.lane for slot in held] == [0] * 4
    crowd = [asyncio.create_task(admission.acquire(Want(None, 128, 128))) for _ in range(4)]
    await asyncio.sleep(0.3)
    # llama.cpp full, vLLM idle: still llama.cpp's (both busy at once is slower than either).
    assert admission.waiting == 4 and lanes[1].running == 0
    held.pop().release()
    assert (await crowd[0]).lane == 0  # the freed slot goes to the first in line
    # Near the queue's limit, the rest take vLLM's free slots rather than be refused.
    assert [(await w).lane for w in crowd[1:]] == [1, 1, 1]
    for slot in held:
        slot.release()


def _with_turns(lanes: list[Lane], queue: int = 16) -> Admission:
    """Admission as a combined profile's: the router's choice, and its turn for recalls."""
    registry = CollectorRegistry()
    running = Gauge("running", "", ["model"], registry=registry)
    waiting = Gauge("waiting", "", ["model"], registry=registry)
    router = Router([LLAMA, VLLM])
    limits = Limits(sum(lane.max_running for lane in lanes), queue, 5.0)
    return Admission(
        "m", limits, running, waiting, lanes=lanes, choose=router.choose,
        moments=router.moments, turn=lambda: router.turn_now, prompt_s=router.prompt_s,
        alone=router.alone,
    )  # fmt: skip


async def test_a_change_of_turn_recalls_what_the_old_engine_has_not_begun() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    # A burst's first three arrive one by one: llama.cpp's turn at loads of one to three.
    first = [await admission.acquire(want) for _ in range(3)]
    assert [slot.lane for slot in first] == [0, 0, 0]
    recalls = [slot.recallable() for slot in first]
    assert all(r is not None and not r.is_set() for r in recalls)
    # The fourth shows the crowd: vLLM's turn. The three llama.cpp has not begun to answer
    # are taken back, and go first to vLLM with the rest, none left to drain.
    crowd = [asyncio.create_task(admission.acquire(want)) for _ in range(5)]
    await asyncio.sleep(0)
    assert all(r is not None and r.is_set() for r in recalls)
    # Each gives back its slot and asks again, before the crowd (two in line ahead of it).
    first[0].release()
    again = [asyncio.create_task(admission.acquire(want, again=True))]
    first[1].release()
    again.append(asyncio.create_task(admission.acquire(want, again=True)))
    await asyncio.sleep(0)
    assert [entry[0] in admission._again for entry in admission._queue] == [True] * 2 + [False] * 5
    first[2].release()
    again.append(asyncio.create_task(admission.acquire(want, again=True)))
    assert [(await w).lane for w in again] == [1, 1, 1]
    assert [(await w).lane for w in crowd] == [1] * 5
    assert lanes[0].running == 0 and lanes[1].running == 8
    # The share goes to the engine that answers: llama.cpp took none, and gave three back.
    assert (lanes[0].taken, lanes[0].recalled, lanes[1].taken) == (0, 3, 8)


async def test_a_request_its_engine_has_begun_to_answer_stays() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    answered, fresh, old = [await admission.acquire(want) for _ in range(3)]
    begun = answered.recallable()
    answered.settled()  # its first token is out: it stays on llama.cpp
    recall = fresh.recallable()
    late = old.recallable()
    old.handed_at -= 2.0  # handed two seconds ago: its engine's work is not thrown away
    crowd = [asyncio.create_task(admission.acquire(want)) for _ in range(5)]
    await asyncio.sleep(0)
    assert begun is not None and not begun.is_set()
    assert late is not None and not late.is_set()
    assert recall is not None and recall.is_set()
    fresh.release()
    answered.release()
    old.release()
    assert [(await w).lane for w in crowd] == [1] * 5
    assert (lanes[0].taken, lanes[0].recalled) == (2, 1)


async def test_a_request_that_only_the_old_engine_serves_is_not_recalled() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    mine = await admission.acquire(Want(frozenset({0}), 128, 128))
    others = [await admission.acquire(Want(None, 128, 128)) for _ in range(2)]
    recall = mine.recallable()
    crowd = [asyncio.create_task(admission.acquire(Want(None, 128, 128))) for _ in range(5)]
    await asyncio.sleep(0)
    assert recall is not None and not recall.is_set()
    for slot in (mine, *others):
        slot.release()
    assert [(await w).lane for w in crowd] == [1] * 5


def test_a_slot_off_its_engines_turn_or_of_one_engine_is_never_recalled() -> None:
    registry = CollectorRegistry()
    one = Admission(
        "m", Limits(1, 1, 1.0), Gauge("r", "", ["model"], registry=registry),
        Gauge("w", "", ["model"], registry=registry),
    )  # fmt: skip

    async def take() -> None:
        slot = await one.acquire()
        assert slot.recallable() is None  # one engine: no turns
        slot.release()
        # A waiter out of patience takes the other engine's free slot: never taken back.
        lanes = [Lane("llamacpp", 4, running=3), Lane("vllm", 1)]
        admission = _with_turns(lanes)
        admission.lanes[1].running = 1
        spilled = admission._take(0, Want(None, 128, 128))
        assert not spilled.on_turn and spilled.recallable() is None

    asyncio.run(take())


async def test_a_whole_answer_moves_only_while_its_prompt_may_be_computing() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    fresh, old, stream = [await admission.acquire(want) for _ in range(3)]
    # Three prompts of 128 tokens at 155 ms each: llama.cpp's batch may run 0.465 s.
    recall = fresh.recallable(streamed=False)
    decoding = old.recallable(streamed=False)
    old.handed_at -= 0.6  # its prompt is done: it decodes, and would go on a while if cut
    streamed = stream.recallable()
    stream.handed_at -= 0.6  # no first token yet: a stream still moves
    crowd = [asyncio.create_task(admission.acquire(want)) for _ in range(5)]
    await asyncio.sleep(0)
    assert decoding is not None and not decoding.is_set()
    assert recall is not None and recall.is_set()
    assert streamed is not None and streamed.is_set()
    # Held until llama.cpp can have finished the batch it may have begun with them.
    assert recall.linger_s == pytest.approx(0.465, abs=0.05)
    assert streamed.linger_s == 0.0
    for slot in (fresh, old, stream):
        slot.release()
    assert [(await w).lane for w in crowd] == [1] * 5


async def test_recalled_requests_are_not_counted_as_kept_by_their_engine() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    begun, cut, voided = [await admission.acquire(want) for _ in range(3)]
    assert admission.kept(0) == 3
    begun.recallable()
    begun.settled()  # its first token came: it stays
    cut_recall, voided_recall = cut.recallable(), voided.recallable()
    crowd = [asyncio.create_task(admission.acquire(want)) for _ in range(5)]
    await asyncio.sleep(0)
    assert cut_recall is not None and cut_recall.is_set()
    assert voided_recall is not None and voided_recall.is_set()
    # Both recalled hold their slots meanwhile; llama.cpp is meant to work on the begun one.
    assert lanes[0].running == 3 and admission.kept(0) == 1
    voided.settled()  # its answer came as the recall did: it stays, and counts again
    assert admission.kept(0) == 2
    cut.release()
    assert admission.kept(0) == 2 and lanes[0].running == 2
    for slot in (begun, voided):
        slot.release()
    await asyncio.gather(*crowd)


class _Says:
    """An engine client that says it works on `counts` requests, one ask after another (the
    last for good; None: it does not say)."""

    def __init__(self, *counts: int | None) -> None:
        self.counts = list(counts)
        self.asked = 0
        self.engine = SimpleNamespace(working_path=None if counts == (None,) else "/slots")

    async def working(self) -> int | None:
        self.asked += 1
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]


async def test_a_recalled_request_holds_its_slot_until_its_engine_is_done_with_it() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    begun, *cut = [await admission.acquire(want) for _ in range(3)]
    recalls = [slot.recallable() for slot in cut]
    crowd = [asyncio.create_task(admission.acquire(want)) for _ in range(5)]
    await asyncio.sleep(0)
    served = cast(ServedModel, SimpleNamespace(admission=admission, router=Router([LLAMA, VLLM])))
    recall = recalls[0]
    assert recall is not None and recall.is_set() and admission.kept(0) == 1
    recall.linger_s = 5.0  # the bound from prompt speeds
    loop = asyncio.get_running_loop()
    # llama.cpp still computes the cut prompts (three slots busy), then only the begun one.
    says = _Says(3, 3, 1)
    began = loop.time()
    await _linger(cast(EngineClient, says), served, 0, recall)
    assert says.asked == 3 and loop.time() - began < 2.0
    # An engine that does not say what it works on: held for the whole bound, not asked.
    recall.linger_s = 0.2
    silent = _Says(None)
    began = loop.time()
    await _linger(cast(EngineClient, silent), served, 0, recall)
    assert silent.asked == 0 and loop.time() - began >= 0.2
    # One that says is held past the bound from prompt speeds while it still works on the cut
    # prompt (beside a busy engine it is many times slower than alone), and an answer that did
    # not come (None) is asked again, not taken for an engine that does not say.
    recall.linger_s = 0.01
    busy = _Says(2, None, 2, 2, 2, 1)
    began = loop.time()
    await _linger(cast(EngineClient, busy), served, 0, recall)
    assert busy.asked == 6 and loop.time() - began >= 5 * LINGER_ASK_S
    for slot in (begun, *cut):
        slot.release()
    await asyncio.gather(*crowd)


async def test_a_burst_on_its_way_is_judged_whole() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    # One user alone: llama.cpp.
    alone = await admission.acquire(want)
    assert alone.lane == 0
    alone.release()
    # The first of sixteen reaches admission while fifteen are still being read: vLLM's turn
    # from the first, nothing to take back.
    with contextlib.ExitStack() as others:
        for _ in range(15):
            others.enter_context(admission.arriving())
        first = await admission.acquire(want)
    assert first.lane == 1
    # Nothing on its way any more: the count is back to what runs and waits.
    assert admission._coming == 0


async def test_a_request_right_after_another_waits_until_its_burst_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Wider than the service's, so that a slow test machine keeps the order of things.
    monkeypatch.setattr(admission_module, "BURST_GAP_S", 1.0)
    monkeypatch.setattr(admission_module, "BURST_QUIET_S", 0.05)
    monkeypatch.setattr(admission_module, "BURST_WAIT_S", 5.0)
    admission = _with_turns([Lane("llamacpp", 4), Lane("vllm", 32)])
    loop = asyncio.get_running_loop()
    with admission.arriving() as close:
        assert not close  # on its own: judged after one turn of the event loop
        await asyncio.wait_for(admission.gathered(close), 0.04)
    with admission.arriving() as close:
        assert close  # right after the first: one of a burst
        began = loop.time()
        waiting = asyncio.create_task(admission.gathered(close))
        await asyncio.sleep(0.01)
        with admission.arriving():  # more of the burst are read meanwhile
            await asyncio.sleep(0.01)
            assert not waiting.done()
        await waiting
        # Until a quiet spell after the last one came.
        assert loop.time() - began >= 0.09
    admission._arrived_at -= 2.0  # long after the last: a user on their own again
    with admission.arriving() as close:
        assert not close


async def _arrive(admission: Admission, want: Want) -> Slot:
    """One request as the proxy brings it: on its way, its burst read, then a slot."""
    with admission.arriving() as close:
        await admission.gathered(close, want)
        return await admission.acquire(want)


async def _a_crowd_on_vllm_then_a_pause(admission: Admission, want: Want) -> None:
    """Eight users served by vLLM, then gone: nothing runs, nobody is about to come back, and
    the turn is still vLLM's."""
    wave = await asyncio.gather(*(_arrive(admission, want) for _ in range(8)))
    assert {slot.lane for slot in wave} == {1}
    for slot in wave:
        slot.release()
    await asyncio.sleep(RETURN_S + 0.05)


async def test_a_burst_after_a_crowd_left_is_judged_whole_from_its_first_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Wider than the service's, so that a slow test machine keeps the order of things.
    monkeypatch.setattr(admission_module, "BURST_GAP_S", 0.05)
    monkeypatch.setattr(admission_module, "BURST_QUIET_S", 0.05)
    monkeypatch.setattr(admission_module, "BURST_WAIT_S", 5.0)
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)
    loop = asyncio.get_running_loop()
    arrive = functools.partial(_arrive, admission, want)

    await _a_crowd_on_vllm_then_a_pause(admission, want)
    # The next burst's first request arrives on its own, nothing running, the turn still
    # vLLM's: it waits until the burst is read, and goes with it to vLLM (without the wait: to
    # llama.cpp as one user's, recalled once the rest came).
    first = asyncio.create_task(arrive())
    await asyncio.sleep(0.01)
    assert not first.done()
    burst = await asyncio.gather(first, *(arrive() for _ in range(7)))
    assert {slot.lane for slot in burst} == {1}
    assert lanes[0].taken == lanes[0].recalled == 0
    for slot in burst:
        slot.release()
    await asyncio.sleep(RETURN_S + 0.05)
    # One user after the crowd: waits for a quiet spell once, then llama.cpp's.
    began = loop.time()
    alone = await arrive()
    assert alone.lane == 0 and loop.time() - began >= 0.05
    alone.release()
    # The turn is theirs now: after a pause as in a loop (an answer's time after the last
    # arrival, which here is all but none), judged at once.
    for pause in (RETURN_S + 0.05, 0.06):
        await asyncio.sleep(pause)
        began = loop.time()
        alone = await arrive()
        assert alone.lane == 0 and loop.time() - began < 0.04, pause
        alone.release()


async def test_a_tokenize_before_a_burst_leaves_the_turn_where_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission_module, "BURST_QUIET_S", 0.05)
    monkeypatch.setattr(admission_module, "BURST_WAIT_S", 5.0)
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)

    arrive = functools.partial(_arrive, admission)

    await _a_crowd_on_vllm_then_a_pause(admission, want)
    # A load generator tokenizes before its next burst (vLLM's serving benchmark does): judged
    # as one user alone it went to llama.cpp and made the turn llama.cpp's, so the burst's first
    # request followed it there and was recalled. Outside the turns it is answered by an engine
    # with room (llama.cpp: vLLM may be resting), whose turn it is stays, nothing can recall it,
    # and its end is nobody's next request.
    tokenize = await arrive(Want(None, 8, 0, turns=False))
    assert tokenize.lane == 0 and tokenize.recallable() is None
    assert admission._turn() == 1
    tokenize.release()
    assert admission._returning() == 0
    burst = await asyncio.gather(*(arrive(want) for _ in range(8)))
    assert {slot.lane for slot in burst} == {1}
    assert lanes[0].recalled == 0
    # While an engine works, a tokenize goes to it (awake), at any load, the turn unchanged.
    beside = await arrive(Want(None, 8, 0, turns=False))
    assert beside.lane == 1 and admission._turn() == 1
    for slot in (beside, *burst):
        slot.release()


async def test_the_next_wave_of_a_crowd_is_judged_whole() -> None:
    lanes = [Lane("llamacpp", 4), Lane("vllm", 32)]
    admission = _with_turns(lanes)
    want = Want(None, 128, 128)

    async def arrive() -> Slot:
        with admission.arriving():
            return await admission.acquire(want)

    # One user in a loop: each answer's end and the next request cancel out, llama.cpp.
    for _ in range(3):
        alone = await arrive()
        assert alone.lane == 0
        alone.release()
    await asyncio.sleep(RETURN_S + 0.05)
    # Eight users on vLLM, whose equal answers end in the same step.
    with contextlib.ExitStack() as others:
        for _ in range(7):
            others.enter_context(admission.arriving())
        wave = [await admission.acquire(want)]
    wave += [await arrive() for _ in range(7)]
    assert {slot.lane for slot in wave} == {1}
    for slot in wave:
        slot.release()
    # The first of the next wave finds nothing running, but seven clients are about to send
    # theirs: still a crowd, vLLM.
    first = await arrive()
    assert first.lane == 1
    first.release()
    # Past `RETURN_S` nobody came back: one user alone again.
    await asyncio.sleep(RETURN_S + 0.05)
    alone = await arrive()
    assert alone.lane == 0
    alone.release()
