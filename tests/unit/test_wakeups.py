"""The front sleeps while nothing happens: no poll of a running engine's exit, no 0.1 s tick.

Each wake-up of the front takes CPU from an engine's threads, which hold every core while they
decode (see `runtime.DrainingServer.main_loop`)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest
import uvicorn

from inferd.server import runtime, supervisor
from inferd.server.supervisor import Supervisor


def _sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays `asyncio.sleep` is called with from now on (the supervisor's polls)."""
    seen: list[float] = []
    real = asyncio.sleep

    async def counted(delay: float, *args: object) -> None:
        seen.append(delay)
        await real(delay)

    monkeypatch.setattr(asyncio, "sleep", counted)
    return seen


async def _child(code: int, after_s: float) -> asyncio.subprocess.Process:
    script = f"import time, sys; time.sleep({after_s}); sys.exit({code})"
    return await asyncio.create_subprocess_exec(sys.executable, "-c", script)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd on this system")
async def test_a_running_engine_is_not_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = _sleeps(monkeypatch)
    proc = await _child(3, after_s=0.6)
    assert await asyncio.wait_for(Supervisor._exited(proc), 30) == 3
    # Three polls at EXIT_POLL_S would have run while it slept; only the reaping may poll.
    assert supervisor.EXIT_POLL_S not in sleeps
    assert all(s == supervisor.REAP_POLL_S for s in sleeps)


async def test_without_pidfd_the_exit_is_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = _sleeps(monkeypatch)
    monkeypatch.setattr(supervisor, "_pidfd", lambda pid: None)
    proc = await _child(5, after_s=0.3)
    assert await asyncio.wait_for(Supervisor._exited(proc), 30) == 5
    assert supervisor.EXIT_POLL_S in sleeps


async def test_an_engine_gone_before_the_wait_returns_its_code() -> None:
    proc = await _child(7, after_s=0)
    await proc.wait()
    assert await Supervisor._exited(proc) == 7


async def test_the_main_loop_ends_as_soon_as_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Told from another thread (as a signal handler would): the loop ends without waiting
    for its next tick, which here would come in an hour."""
    monkeypatch.setattr(runtime, "TICK_S", 3600.0)

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request is served here")

    server = runtime.DrainingServer(uvicorn.Config(app), proxy=None, drain_timeout_s=1)  # type: ignore[arg-type]
    server._loop = asyncio.get_running_loop()
    assert server.should_exit is False
    ticks = 0
    real_tick = server.on_tick

    async def on_tick(counter: int) -> bool:
        nonlocal ticks
        ticks += 1
        return await real_tick(counter)

    monkeypatch.setattr(server, "on_tick", on_tick)
    loop_ended = asyncio.ensure_future(server.main_loop())
    await asyncio.sleep(0.3)
    assert not loop_ended.done()
    assert ticks == 1  # nothing woke it meanwhile (uvicorn's own loop ticks every 0.1 s)
    telling = threading.Thread(target=setattr, args=(server, "should_exit", True))
    telling.start()
    telling.join()
    await asyncio.wait_for(loop_ended, 10)
    assert ticks == 2  # the first, and the one that read `should_exit`
