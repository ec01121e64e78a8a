"""Models on demand on vLLM, live: `inferd serve SMOL QWEN --max-loaded 1`, SmolLM2 on vLLM's CPU
build and Qwen2.5-Coder on llama.cpp, nothing loaded at start.

A cold request for SmolLM2 waits while vLLM starts (minutes on 2 cores) and is answered through
the official `openai` client; a request for Qwen then evicts it: vLLM's whole process tree (its
server, engine core, worker, resource tracker) is gone and its memory with it, `/v1/models` shows
each state as it changes and the load and unload metrics count them. One vLLM load, one eviction:
test_on_demand.py covers the policy (LRU among several, concurrency, idleness, pins) on llama.cpp,
whose loads take seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EAGER, MODEL, VLLM_PROFILE, Served, serving
from tests.e2e.test_on_demand import QWEN, _complete, _states, _tree_rss

pytestmark = pytest.mark.e2e

PROFILES = f"{MODEL}={VLLM_PROFILE},{QWEN}=llamacpp-cpu-q4_k_m"
# vLLM's load on demand, measured on a shared 2-core EPYC (AVX2 kernels, load average 5): 354 s
# the first time (torch.compile), 220-263 s later. The default load_timeout_s (600 s) covers it:
# the cold request waits for the load with the defaults.
LOAD_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = LOAD_TIMEOUT_S + 60


@contextlib.contextmanager
def on_demand_service(tmp: Path, profiles: str) -> Iterator[Served]:
    """`inferd serve SMOL QWEN --profile PROFILES --max-loaded 1`, vLLM uncompiled; once left,
    the service has exited cleanly and none of its engines outlived it."""
    args = ("--profile", profiles, "--max-loaded", "1", EAGER)
    with serving(tmp, MODEL, QWEN, *args) as s:
        yield s
        engines = _tree(s)
    assert s.proc.returncode == 0, s.log_tail()
    _, alive = psutil.wait_procs(engines, timeout=10)
    assert all(_zombie(p) for p in alive), "an engine outlived the service"


@pytest.fixture(scope="module")
def on_demand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with on_demand_service(tmp_path_factory.mktemp("vllm-on-demand"), PROFILES) as s:
        yield s


def _tree(served: Served) -> list[psutil.Process]:
    """The service's live descendants: its engines' processes (inferd runs nothing else)."""
    return [p for p in served.descendants() if not _zombie(p)]


def _zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True  # gone


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _metric(served: Served, name: str, **labels: str) -> float:
    text = httpx.get(served.url + "/v1/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in /v1/metrics")


@contextlib.contextmanager
def _watching(served: Served) -> Iterator[dict[str, list[str]]]:
    """Each model's states in `/v1/models` while the block runs, as they change (polled every
    0.2 s; a state held for less may be missed), and once more after it."""
    seen: dict[str, list[str]] = {}
    done = threading.Event()

    def poll() -> None:
        with contextlib.suppress(httpx.HTTPError):
            for model, state in _states(served).items():
                if seen.setdefault(model, [])[-1:] != [state]:
                    seen[model].append(state)

    def watch() -> None:
        while not done.wait(0.2):
            poll()

    poll()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()
        poll()


def _client(served: Served) -> openai.OpenAI:
    # No retries: a 503 must fail the test, not be hidden by the client's own retry.
    return openai.OpenAI(
        base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )


def test_a_cold_request_waits_for_vllm_and_is_answered(on_demand: Served) -> None:
    assert _states(on_demand) == {MODEL: "unloaded", QWEN: "unloaded"}
    assert _tree(on_demand) == []  # ready with nothing loaded
    with _watching(on_demand) as seen:
        began = time.monotonic()
        answer = _client(on_demand).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        waited = time.monotonic() - began
    assert answer.model == MODEL and answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    assert seen == {MODEL: ["unloaded", "loading", "loaded"], QWEN: ["unloaded"]}, seen
    names = [p.name() for p in _tree(on_demand)]
    assert "VLLM::EngineCore" in names and "llama-server" not in names, names
    assert _metric(on_demand, "inferd_model_loads_total", model=MODEL) == 1
    assert _metric(on_demand, "inferd_model_loaded", model=MODEL) == 1
    assert _metric(on_demand, "inferd_model_loads_total", model=QWEN) == 0
    # The load is what the request waited for: timed by inferd, within the request's wait.
    load_s = _metric(on_demand, "inferd_model_load_seconds_sum", model=MODEL)
    assert 0 < load_s <= waited, (load_s, waited)


def test_a_request_for_another_model_evicts_vllm_and_its_whole_tree(on_demand: Served) -> None:
    vllm = _tree(on_demand)
    assert vllm, "vLLM is not loaded (the previous test failed?)"
    vllm_rss, tree_rss = _rss(vllm), _tree_rss(on_demand)
    with _watching(on_demand) as seen:
        answer = _complete(_client(on_demand), QWEN)
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    # Every process vLLM ran is gone (stopped before Qwen's engine started), none orphaned.
    _, alive = psutil.wait_procs(vllm, timeout=10)
    assert all(_zombie(p) for p in alive), [(p.pid, p.name()) for p in alive]
    engines = _tree(on_demand)
    assert [p.name() for p in engines] == ["llama-server"]
    # Its memory is back: the service now holds Qwen's engine where vLLM's tree was.
    assert _tree_rss(on_demand) - _rss(engines) <= tree_rss - vllm_rss * 0.9
    assert seen[MODEL] in (["loaded", "unloaded"], ["loaded", "unloading", "unloaded"]), seen
    assert seen[QWEN] == ["unloaded", "loading", "loaded"], seen
    assert _metric(on_demand, "inferd_model_unloads_total", model=MODEL, reason="evicted") == 1
    assert _metric(on_demand, "inferd_model_loaded", model=MODEL) == 0
    assert _metric(on_demand, "inferd_model_loads_total", model=MODEL) == 1
    assert _metric(on_demand, "inferd_model_loads_total", model=QWEN) == 1
    assert _metric(on_demand, "inferd_model_loaded", model=QWEN) == 1
    for model in (MODEL, QWEN):
        assert _metric(on_demand, "inferd_model_load_failures_total", model=model) == 0
