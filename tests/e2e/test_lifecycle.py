"""Stopping `inferd serve` while its engine starts leaves no engine process behind; llama.cpp is
warmed up before it is called ready.

A SIGTERM once ready is test_hardening.py's drain test, on every engine (it checks the exit
status and that each of the engines' processes is gone). This starts its own server with vLLM
uncompiled (conftest.EAGER): its start-up path is the same.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import (
    EAGER,
    LLAMACPP_PROFILE,
    VLLM,
    Served,
    engine_client,
    engine_socket,
    serving,
    start,
)

pytestmark = pytest.mark.e2e
EAGER_VLLM = (*VLLM, EAGER)


def _wait_for_engine_processes(served: Served, timeout: float = 300) -> list[psutil.Process]:
    """Wait until vLLM has spawned its engine core (a child of the API server process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = served.descendants()
        if len(children) >= 2:
            return children
        assert served.proc.poll() is None, served.log_tail()
        time.sleep(0.2)
    raise AssertionError(f"no engine process appeared:\n{served.log_tail()}")


def _gone(processes: list[psutil.Process], timeout: float = 5) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def test_ctrl_c_while_the_engine_starts_stops_everything(tmp_path: Path) -> None:
    served = start(tmp_path, *EAGER_VLLM)
    children = _wait_for_engine_processes(served)
    assert served.stop(signal.SIGINT) == 0
    assert not _gone(children)
    assert "Traceback" not in served.log_tail(200)


def test_llamacpp_is_warmed_up_before_it_is_called_ready(tmp_path: Path) -> None:
    """llama-server's first chat after its start is slower than the next; the supervisor sends
    it one small chat, straight to the engine, before it calls it ready: at readiness a slot has
    served it, and the front has counted no request."""
    with serving(tmp_path, "--profile", LLAMACPP_PROFILE) as served:
        socket, key = engine_socket(served)
        with engine_client(socket, key) as engine:
            slots = engine.get("/slots").json()
        metrics = httpx.get(served.url + "/metrics", timeout=10).text
    # A slot that has never served lists only its id, context, speculation and whether busy.
    assert any("id_task" in slot for slot in slots), slots
    assert "request_success_total{" not in metrics
