"""Models on demand with both engines behind one model, live: `inferd serve SMOL QWEN --profile
SMOL=cpu-both,QWEN=llamacpp-cpu-q4_k_m --max-loaded 1`, nothing loaded at start.

SmolLM2's cold request is answered as soon as its first engine (llama.cpp) is loaded; vLLM starts
behind it and joins, and a request only vLLM serves (`tool_choice: required`) is answered by it.
A request for Qwen then evicts SmolLM2 whole: llama-server and every process of vLLM's tree are
gone, and one unload is counted. Reloading and eviction during vLLM's start are covered over
recorded engines (tests/integration/test_on_demand.py); vLLM alone on demand in
test_on_demand_vllm.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.e2e.conftest import MODEL, Served
from tests.e2e.test_both_engines import WEATHER_TOOL
from tests.e2e.test_on_demand import QWEN, _complete, _states
from tests.e2e.test_on_demand_vllm import _client, _metric, _tree, _zombie, on_demand_service

pytestmark = pytest.mark.e2e

PROFILES = f"{MODEL}=cpu-both,{QWEN}=llamacpp-cpu-q4_k_m"
VLLM_JOIN_S = 600  # vLLM's eager start behind llama.cpp on a shared 2-core machine


@pytest.fixture(scope="module")
def on_demand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with on_demand_service(tmp_path_factory.mktemp("both-on-demand"), PROFILES) as s:
        yield s


def _engines(served: Served) -> list[dict[str, object]]:
    ready = httpx.get(served.url + "/v1/health/ready", timeout=10).json()
    engines: list[dict[str, object]] = ready["models"][MODEL].get("engines", [])
    return engines


def test_both_engines_load_on_demand_and_are_evicted_together(on_demand: Served) -> None:
    assert _states(on_demand) == {MODEL: "unloaded", QWEN: "unloaded"}
    assert _tree(on_demand) == []
    client = _client(on_demand)
    answer = _complete(client, MODEL)  # loaded once llama.cpp answers
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    assert _states(on_demand)[MODEL] == "loaded"

    deadline = time.monotonic() + VLLM_JOIN_S
    while time.monotonic() < deadline:
        if [e["state"] for e in _engines(on_demand)] == ["ready", "ready"]:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"vLLM did not join: {_engines(on_demand)}\n{on_demand.log_tail()}")
    names = [p.name() for p in _tree(on_demand)]
    assert "llama-server" in names and "VLLM::EngineCore" in names, names
    # Only vLLM serves `tool_choice: required` here: answered by the engine that joined.
    required = httpx.post(
        on_demand.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "max_tokens": 40,
        },
        timeout=300,
    )
    assert required.status_code == 200, required.text
    assert _metric(on_demand, "inferd_engine_requests_total", model=MODEL, engine="vllm") >= 1

    smol = _tree(on_demand)
    qwen = _complete(client, QWEN)  # room for one model: both of SmolLM2's engines stop
    assert qwen.usage is not None and qwen.usage.completion_tokens >= 1
    _, alive = psutil.wait_procs(smol, timeout=10)
    assert all(_zombie(p) for p in alive), [(p.pid, p.name()) for p in alive]
    assert [p.name() for p in _tree(on_demand)] == ["llama-server"]
    assert _states(on_demand) == {MODEL: "unloaded", QWEN: "loaded"}
    assert [e["state"] for e in _engines(on_demand)] == ["stopped", "stopped"]
    assert _metric(on_demand, "inferd_model_unloads_total", model=MODEL, reason="evicted") == 1
