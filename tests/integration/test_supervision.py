"""The supervisor with a real process: readiness, crash mid-stream, restart, failing start, stop;
the engine's key, and its socket taken by another process; a later engine's start and the build
of its model behind the first engine, paused and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import psutil
import pytest

from inferd.errors import CacheError
from inferd.server.engine_link import RuntimeFolder
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import REST_AFTER_S, State, Supervisor
from tests.integration.conftest import MODEL, served_model, start_front, stop_front


def test_ready_only_after_engine_answers(tmp_path: Path) -> None:
    front = start_front(served_model(tmp_path, "--ready-after", "1.5"))
    try:
        with front.client() as c:
            assert c.get("/v1/health/live").status_code == 200
            r = c.get("/v1/health/ready")
            assert r.status_code == 503
            assert r.json()["models"][MODEL]["state"] == "starting"
            chat = c.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert chat.status_code == 503
            assert chat.headers["retry-after"]
            assert chat.json()["error"]["code"] == "engine_not_ready"
        front.wait_ready()
    finally:
        stop_front(front)


def test_crash_mid_stream_ends_the_stream_and_restarts(tmp_path: Path) -> None:
    front = start_front(served_model(tmp_path))
    front.wait_ready()
    first_pid = front.served.supervisor.pid
    try:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "crash"}]}
        with front.client() as c:
            text = c.post("/v1/chat/completions", json=body).text
        events = [e for e in text.split("\n\n") if e]
        err = json.loads(events[-2].removeprefix("data: "))["error"]
        assert err["code"] == "engine_unavailable"
        assert events[-1] == "data: [DONE]"
        front.wait_ready()
        assert front.served.supervisor.restarts == 1
        assert front.served.supervisor.pid != first_pid
    finally:
        stop_front(front)


def test_engine_that_cannot_start_fails_for_good(tmp_path: Path) -> None:
    front = start_front(served_model(tmp_path, "--exit-at-start"))
    try:
        deadline = time.monotonic() + 20
        while not front.served.supervisor.failed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = httpx.get(front.url + "/v1/health/ready").json()["models"][MODEL]
        assert state["state"] == "failed"
        assert "exited with code 4" in state["last_error"]
        assert any("told to fail" in line for line in front.served.supervisor.tail)
    finally:
        stop_front(front)


def test_stop_leaves_no_engine_process(tmp_path: Path) -> None:
    front = start_front(served_model(tmp_path))
    front.wait_ready()
    pid = front.served.supervisor.pid
    assert pid is not None
    engine = psutil.Process(pid)
    assert engine.ppid() == os.getpid()  # the launch shim exec'd into the engine
    stop_front(front)
    assert not psutil.pid_exists(pid) or engine.status() == psutil.STATUS_ZOMBIE


def test_front_sends_the_engine_its_key_on_every_call(tmp_path: Path) -> None:
    """The engine requires the start's key (like llama-server and vLLM with theirs): the
    supervisor's health and version calls, forwarded requests, token counts, the model list and
    the metrics scrape all carry it; a local process without it is refused."""
    front = start_front(served_model(tmp_path, "--require-key"))
    try:
        front.wait_ready()  # the health route needs the key too
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        with front.client() as c:
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
            streamed = c.post("/v1/chat/completions", json={**chat, "stream": True}).text
            assert streamed.rstrip().endswith("data: [DONE]")
            assert c.post("/v1/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 200
            counted = c.post(
                "/v1/messages/count_tokens",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert counted.status_code == 200
            models = c.get("/v1/models").json()["data"]
            assert models[0]["max_model_len"] == 8192  # the engine's own list
            assert "0.32.0" in c.get("/v1/metadata").text  # the engine's version route
            assert "\nvllm:" in c.get("/metrics").text  # the engine's metrics
        with front.engine() as engine:
            assert engine.post("/v1/chat/completions", json=chat).status_code == 401
            wrong = {"Authorization": "Bearer not-the-key"}
            assert engine.get("/metrics", headers=wrong).status_code == 401
            assert engine.get("/debug/open-streams").json()["refused"] == 2
    finally:
        stop_front(front)


class _Squatter(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path} {self.headers.get('Authorization')}")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_a_socket_taken_by_another_process_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local process of inferd's user (no other user can enter the 0700 folder) binds
    the engine's socket path before the engine does, and answers /health: each start fails,
    and the squatter gets no request (nor the key)."""
    squatters: list[_UnixHTTPServer] = []
    make_path = RuntimeFolder.socket

    def taken(folder: RuntimeFolder, start: int) -> Path:
        path = make_path(folder, start)
        squatters.append(_UnixHTTPServer(str(path), _Squatter))
        threading.Thread(target=squatters[-1].serve_forever, daemon=True).start()
        return path

    _Squatter.seen = []
    monkeypatch.setattr(RuntimeFolder, "socket", taken)
    front = start_front(served_model(tmp_path, "--ready-after", "5"))
    try:
        sup = front.served.supervisor
        deadline = time.monotonic() + 30
        while not sup.failed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = httpx.get(front.url + "/v1/health/ready").json()["models"][MODEL]
        assert state["state"] == "failed"
        assert "is held by another process, not by the engine" in state["last_error"]
        assert len(squatters) == 3  # MAX_START_FAILURES starts, each refused
        assert _Squatter.seen == []
    finally:
        stop_front(front)
        for squatter in squatters:
            squatter.shutdown()
            squatter.server_close()


async def test_a_start_behind_another_engine_pauses_and_its_deadline_waits(
    tmp_path: Path,
) -> None:
    # Ready 1.5 s after it starts; the deadline (6 s: the start runs in the idle scheduling
    # class, slow on a busy machine) is shorter than the time it is held.
    served = served_model(tmp_path, "--ready-after", "1.5")
    engine = served.supervisor.engine
    supervisor = Supervisor(engine, ready_timeout_s=6, backoff_s=(0.2,), nice=10)
    supervisor.pause()  # asked before the process exists: it is stopped once spawned
    supervisor.start()
    try:
        while supervisor.pid is None:  # noqa: ASYNC110 (no event marks the spawn)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        group = [psutil.Process(supervisor.pid)]
        assert all(p.status() == psutil.STATUS_STOPPED for p in group)
        await asyncio.sleep(7.0)  # held past its ready time and past its deadline
        assert supervisor.state is State.STARTING and supervisor.describe()["paused"] is True
        supervisor.resume()
        await asyncio.wait_for(supervisor.ready.wait(), 20)
        assert supervisor.paused_s >= 7.0 and supervisor.restarts == 0
        assert psutil.Process(supervisor.pid).status() != psutil.STATUS_STOPPED
        supervisor.pause()  # an engine serving is never paused
        assert not supervisor.paused
        assert psutil.Process(supervisor.pid).status() != psutil.STATUS_STOPPED
    finally:
        await supervisor.stop()
    assert supervisor.describe()["state"] == State.STOPPED.value


async def test_a_paused_start_is_stopped_at_once(tmp_path: Path) -> None:
    served = served_model(tmp_path, "--ready-after", "30")
    supervisor = Supervisor(served.supervisor.engine, ready_timeout_s=60, nice=10)
    supervisor.start()
    while supervisor.pid is None:  # noqa: ASYNC110 (no event marks the spawn)
        await asyncio.sleep(0.02)
    pid = supervisor.pid
    supervisor.pause()
    began = time.monotonic()
    await supervisor.stop()  # a stopped process takes SIGTERM only once continued
    assert time.monotonic() - began < 5
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_ready_later_engine_rests_while_idle_and_wakes_for_the_front(
    tmp_path: Path,
) -> None:
    served = served_model(tmp_path)
    supervisor = Supervisor(served.supervisor.engine, ready_timeout_s=20, nice=10)
    supervisor.start()
    try:
        await asyncio.wait_for(supervisor.ready.wait(), 20)
        assert supervisor.pid is not None
        engine = psutil.Process(supervisor.pid)
        supervisor.rest(True)
        assert not supervisor.parked  # not at once: a crowd's requests come and go
        await asyncio.sleep(REST_AFTER_S + 0.5)
        assert supervisor.parked and engine.status() == psutil.STATUS_STOPPED
        assert supervisor.describe()["parked"] is True
        # The front's own ask wakes it, is answered, and it rests again afterwards.
        answer = await supervisor.fetch("/health")
        assert answer is not None and answer[0] == 200
        assert engine.status() != psutil.STATUS_STOPPED
        await asyncio.sleep(REST_AFTER_S + 0.5)
        assert supervisor.parked and supervisor.parks == 2
        supervisor.rest(False)  # a request on its lane: continued before it is sent
        assert not supervisor.parked and engine.status() != psutil.STATUS_STOPPED
        assert supervisor.parked_s > 0
        supervisor.rest(True)
        await asyncio.sleep(REST_AFTER_S + 0.5)
        assert engine.status() == psutil.STATUS_STOPPED
        began = time.monotonic()
    finally:
        await supervisor.stop()  # continued first: a stopped process ignores SIGTERM
    assert time.monotonic() - began < 5
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE


async def test_only_a_later_engine_rests(tmp_path: Path) -> None:
    supervisor = served_model(tmp_path).supervisor  # the first engine of its model: nice 0
    supervisor.start()
    try:
        await asyncio.wait_for(supervisor.ready.wait(), 20)
        supervisor.rest(True)
        await asyncio.sleep(REST_AFTER_S + 0.5)
        assert not supervisor.parked
        assert psutil.Process(supervisor.pid).status() != psutil.STATUS_STOPPED
    finally:
        await supervisor.stop()


async def _loud_engine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Supervisor:
    """A ready engine that prints an error and a traceback when it gets SIGTERM, its output
    captured down to debug."""
    caplog.set_level(logging.DEBUG, logger="inferd.engine")
    supervisor = served_model(tmp_path, "--loud-at-stop").supervisor
    supervisor.start()
    await asyncio.wait_for(supervisor.ready.wait(), 20)
    return supervisor


async def test_what_an_engine_prints_while_it_is_stopped_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = await _loud_engine(tmp_path, caplog)
    await supervisor.stop()
    said = [r for r in caplog.records if r.name.startswith("inferd.engine")]
    loud = [r for r in said if "stopped: its core is gone" in r.getMessage()]
    assert loud and all(r.levelno == logging.DEBUG for r in loud), [r.levelname for r in loud]
    assert any("Traceback" in r.getMessage() and r.levelno == logging.DEBUG for r in said)
    assert any("its core is gone" in line for line in supervisor.tail)


async def test_an_engines_error_while_it_runs_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = await _loud_engine(tmp_path, caplog)
    assert supervisor.pid is not None
    os.kill(supervisor.pid, signal.SIGTERM)  # not inferd's stop: the engine ends on its own
    deadline = time.monotonic() + 20
    # The supervisor has no event for a restart: its count, polled.
    while supervisor.restarts < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await supervisor.stop()
    said = [r for r in caplog.records if r.name.startswith("inferd.engine")]
    loud = [r for r in said if "stopped: its core is gone" in r.getMessage()]
    assert loud and loud[0].levelno == logging.WARNING, [r.levelname for r in loud]


def _build(pids: list[int], seconds: float) -> Callable[[Callable[[int], None]], None]:
    """A later engine's model build (`Backend.check`) whose work is a child process running for
    `seconds`, its pid told as `convert.run_conversion` tells a conversion's."""

    def check(on_spawn: Callable[[int], None]) -> None:
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        pids.append(child.pid)
        on_spawn(child.pid)
        if child.wait() != 0:
            raise CacheError(f"the build's child exited with code {child.returncode}")

    return check


def _behind(
    tmp_path: Path, check: Callable[[Callable[[int], None]], None]
) -> tuple[ServedModel, Supervisor]:
    """A model whose first engine (recorded, started) is followed by a later one built by
    `check`; the model, and the later engine's supervisor."""
    served = served_model(tmp_path)
    later = Supervisor(served.supervisor.engine, ready_timeout_s=20, nice=10)
    served.others = (Backend(served.profile, later, check=check),)
    served.supervisor.start()
    return served, later


async def _until(what: Callable[[], bool], within_s: float = 10) -> None:
    async with asyncio.timeout(within_s):
        while not what():  # noqa: ASYNC110 (a process's state has no event)
            await asyncio.sleep(0.02)


def _status(pid: int) -> str:
    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return "gone"


async def test_a_later_engines_model_is_built_behind_the_first_paused_while_it_serves(
    tmp_path: Path,
) -> None:
    pids: list[int] = []
    served, later = _behind(tmp_path, _build(pids, 1.5))
    later.pause()  # the first engine's users need the cores (`server.warmup.Yield`)
    joining = asyncio.create_task(served.join())
    try:
        await _until(lambda: bool(pids) and _status(pids[0]) == psutil.STATUS_STOPPED)
        assert served.supervisor.state is State.READY  # built once the first engine is ready
        assert later.describe()["state"] == "preparing" and later.paused
        child = psutil.Process(pids[0])
        assert child.nice() == 10 and os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        await asyncio.sleep(2.0)  # held past the build's own length
        assert later.state is State.PREPARING and _status(pids[0]) == psutil.STATUS_STOPPED
        later.resume()
        await _until(lambda: _status(pids[0]) != psutil.STATUS_STOPPED)
        await asyncio.wait_for(later.ready.wait(), 20)  # built, then started
        await joining
        assert later.paused_s >= 2.0 and later.last_error is None
    finally:
        joining.cancel()
        await asyncio.gather(served.supervisor.stop(), later.stop())


async def test_a_stop_while_the_model_is_built_ends_the_build_at_once(tmp_path: Path) -> None:
    pids: list[int] = []
    served, later = _behind(tmp_path, _build(pids, 60))
    joining = asyncio.create_task(served.join())
    try:
        await _until(lambda: bool(pids) and later._preparer is not None)
        later.pause()  # stopped: a stop must still end it
        await _until(lambda: _status(pids[0]) == psutil.STATUS_STOPPED)
        began = time.monotonic()
        await later.stop()
        await asyncio.wait_for(joining, 5)  # given up, not failed
        assert time.monotonic() - began < 5
        assert _status(pids[0]) in ("gone", psutil.STATUS_ZOMBIE)
        assert later.state is State.STOPPED and later.last_error is None
        assert not later.started  # never started after the build it gave up
    finally:
        joining.cancel()
        await served.supervisor.stop()


async def test_a_stop_while_the_model_is_checked_keeps_the_engine_stopped(
    tmp_path: Path,
) -> None:
    # A model already built is only checked (its files' hashes, in the thread, no child): a stop
    # meanwhile, without the join being cancelled, must not be followed by a start.
    checking, checked = threading.Event(), threading.Event()

    def check(on_spawn: Callable[[int], None]) -> None:
        checking.set()
        time.sleep(1.0)
        checked.set()

    served, later = _behind(tmp_path, check)
    joining = asyncio.create_task(served.join())
    try:
        await _until(checking.is_set)
        await later.stop()
        await asyncio.wait_for(joining, 5)
        assert checked.is_set()  # the check finished, and the stop held
        assert not later.started and later.state is State.STOPPED
    finally:
        joining.cancel()
        await asyncio.gather(served.supervisor.stop(), later.stop())


async def test_a_service_stopping_while_the_model_is_built_ends_the_build(
    tmp_path: Path,
) -> None:
    # The front's lifespan cancels the join at shutdown, before it stops the engines: the build
    # must not go on behind it (the service's exit waits for the thread that waits on it).
    pids: list[int] = []
    served, later = _behind(tmp_path, _build(pids, 60))
    joining = asyncio.create_task(served.join())
    try:
        await _until(lambda: bool(pids) and later._preparer is not None)
        joining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await joining
        await _until(lambda: _status(pids[0]) in ("gone", psutil.STATUS_ZOMBIE), within_s=5)
        assert later.state is State.STOPPED
    finally:
        await asyncio.gather(served.supervisor.stop(), later.stop())


async def test_a_failed_build_fails_the_later_engine_alone(tmp_path: Path) -> None:
    def check(on_spawn: Callable[[int], None]) -> None:
        raise CacheError("the wheel could not be fetched (offline)")

    served, later = _behind(tmp_path, check)
    try:
        await asyncio.wait_for(served.join(), 20)
        assert later.state is State.FAILED and later.failed.is_set()
        assert "could not be prepared: the wheel could not be fetched" in str(later.last_error)
        assert served.supervisor.state is State.READY and served.ready
    finally:
        await asyncio.gather(served.supervisor.stop(), later.stop())
