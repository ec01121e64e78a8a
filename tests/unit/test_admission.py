"""Admission control: slots, a bounded FIFO queue, timeouts, and gauges that are exact."""

from __future__ import annotations

import asyncio

import pytest

from inferd.errors import OverloadedError
from inferd.observability.metrics import Metrics
from inferd.server.admission import Admission, Limits


def _admission(running: int = 1, queue: int = 1, timeout: float = 5.0) -> tuple[Admission, Metrics]:
    m = Metrics()
    return Admission(
        "m", Limits(running, queue, timeout), m.requests_running, m.requests_waiting
    ), m


def _gauge(m: Metrics, name: str) -> float:
    return m.registry.get_sample_value(name, {"model": "m"}) or 0.0


async def test_full_queue_is_refused_at_once() -> None:
    adm, m = _admission(running=1, queue=1)
    first = await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert (_gauge(m, "num_requests_running"), _gauge(m, "num_requests_waiting")) == (1, 1)
    with pytest.raises(OverloadedError) as info:
        await asyncio.wait_for(adm.acquire(), 0.1)  # refused, not queued: no timeout involved
    assert info.value.status == 503 and int(info.value.headers()["Retry-After"]) >= 1
    first.release()
    second = await waiter  # the freed slot went straight to the waiter
    assert (_gauge(m, "num_requests_running"), _gauge(m, "num_requests_waiting")) == (1, 0)
    second.release()
    second.release()  # releasing twice is harmless
    assert _gauge(m, "num_requests_running") == 0


async def test_queue_timeout() -> None:
    adm, m = _admission(running=1, queue=4, timeout=0.05)
    slot = await adm.acquire()
    with pytest.raises(OverloadedError, match="no free slot within"):
        await adm.acquire()
    assert adm.waiting == 0 and _gauge(m, "num_requests_waiting") == 0
    slot.release()
    assert adm.running == 0


async def test_first_come_first_served() -> None:
    adm, _ = _admission(running=1, queue=8)
    held = await adm.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        slot = await adm.acquire()
        order.append(i)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.create_task(take(i)) for i in range(5)]
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (adm.running, adm.waiting) == (0, 0)


async def test_a_waiter_that_leaves_gives_up_its_place() -> None:
    adm, _ = _admission(running=1, queue=2)
    held = await adm.acquire()
    leaving = asyncio.create_task(adm.acquire())
    staying = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    leaving.cancel()  # the client disconnected while queued
    await asyncio.sleep(0)
    held.release()
    slot = await staying
    assert (adm.running, adm.waiting) == (1, 0)
    slot.release()
    assert adm.running == 0
