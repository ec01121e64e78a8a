"""Hardening against a real engine: overload, disconnects, long prompts, unknown parameters,
an engine killed mid-stream, and a drain on SIGTERM. One dedicated `inferd serve` per engine
(llama.cpp, and eager vLLM; 2 slots, 2 queue places, 3 s drain) is shared by these tests, in
this order: both engines must behave the same through inferd. That an engine refuses anyone but
inferd: test_engine_isolation.py."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.e2e.conftest import LLAMACPP_PROFILE, MODEL, VLLM_PROFILE, Served, start

pytestmark = pytest.mark.e2e


# Per profile: extra flags, the engine's own gauge of running requests, how to spot its process.
ENGINES = {
    LLAMACPP_PROFILE: ((), "llamacpp:requests_processing", "llama-server"),
    VLLM_PROFILE: (("--engine-args=--enforce-eager",), "vllm:num_requests_running", "api_server"),
}


@pytest.fixture(scope="module", params=list(ENGINES), ids=["llamacpp", "vllm"])
def hard(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    served = start(
        tmp_path_factory.mktemp("hard"),
        "--profile",
        request.param,
        *ENGINES[request.param][0],
        "--max-running",
        "2",
        "--max-queue",
        "2",
        "--drain-timeout-s",
        "3",
    )
    served.wait_ready()
    yield served
    served.stop()


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def _engine_running(served: Served) -> float:
    gauge = ENGINES[served.profile][1]
    for line in httpx.get(served.url + "/v1/metrics", timeout=10).text.splitlines():
        if line.startswith(gauge + "{") or line.startswith(gauge + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("the engine's running gauge is missing")


def test_overload_refuses_fast_and_completes_the_rest(hard: Served) -> None:
    body = _chat("Count to fifty.", max_tokens=48, stream=True, ignore_eos=True)

    def one(_: int) -> tuple[int, float, str]:
        started = time.monotonic()
        with httpx.Client(base_url=hard.url, timeout=120) as c:
            r = c.post("/v1/chat/completions", json=body)
            return r.status_code, time.monotonic() - started, r.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert refused and served
    assert len(served) >= 4  # 2 running + 2 queued
    assert all(elapsed < 1.0 for _, elapsed, _ in refused)
    assert all(text.endswith("data: [DONE]\n\n") for _, _, text in served)


def test_client_disconnect_frees_the_engine_within_2s(hard: Served) -> None:
    body = _chat("Tell a long story.", max_tokens=1000, ignore_eos=True, stream=True)
    with (
        httpx.Client(base_url=hard.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _engine_running(hard) == 1
    deadline = time.monotonic() + 2
    while _engine_running(hard) != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.1)


def test_prompt_longer_than_the_context_is_refused_with_both_counts(hard: Served) -> None:
    long = " ".join(["word"] * 9000)
    r = httpx.post(
        hard.url + "/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": long, "max_tokens": 10},
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    counts = re.search(r"the prompt has (\d+) tokens and the model's context is 8192", message)
    assert counts, message
    assert 8990 <= int(counts.group(1)) <= 9010, message


def test_parameters_the_engine_would_ignore_are_refused(hard: Served) -> None:
    r = httpx.post(hard.url + "/v1/chat/completions", json=_chat("hi", store=True), timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "store"


def test_engine_killed_mid_stream(hard: Served) -> None:
    body = _chat("Tell a long story.", max_tokens=1000, ignore_eos=True, stream=True)
    marker = ENGINES[hard.profile][2]
    engine = next(p for p in hard.descendants() if marker in " ".join(p.cmdline()))
    with (
        httpx.Client(base_url=hard.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        engine.kill()
        rest = [line for line in lines if line]
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable"
    assert rest[-1] == "data: [DONE]"
    deadline = time.monotonic() + 5  # the supervisor notices the exit within a fraction of that
    while (ready := httpx.get(hard.url + "/v1/health/ready", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "readiness never reported the dead engine"
        time.sleep(0.1)
    assert ready.status_code == 503
    assert ready.json()["models"][MODEL]["last_error"]  # the reason is shown
    hard.wait_ready(timeout=300)
    state = httpx.get(hard.url + "/v1/health/ready", timeout=10).json()["models"][MODEL]
    assert state["restarts"] == 1
    assert "exited with code" in state["last_error"]  # the crash stays visible once ready
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE


def test_sigterm_drains_then_cuts_and_exits_clean(hard: Served) -> None:
    body = _chat("Tell a long story.", max_tokens=2000, ignore_eos=True, stream=True)
    hard.wait_ready(timeout=300)
    children = hard.descendants()
    with (
        httpx.Client(base_url=hard.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        hard.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with httpx.Client(base_url=hard.url, timeout=10) as probe:
            assert probe.get("/v1/health/ready").status_code == 503
            late = probe.post("/v1/chat/completions", json=_chat("hi"))
            assert late.status_code == 503
        started = time.monotonic()
        rest = [line for line in lines if line]
        assert 2.0 < time.monotonic() - started < 10.0  # cut at the 3 s drain deadline
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert hard.proc.wait(60) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
