"""Stopping `inferd serve` while its engine starts leaves no engine process behind.

A SIGTERM once ready is test_hardening.py's drain test, on every engine (it checks the exit
status and that each of the engines' processes is gone). This starts its own server with vLLM
uncompiled (conftest.EAGER): its start-up path is the same.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import EAGER, VLLM, Served, start

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
