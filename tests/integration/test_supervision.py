"""The supervisor with a real process: readiness, crash mid-stream, restart, failing start, stop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import psutil

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
