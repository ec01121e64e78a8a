"""Models on demand through the real front and supervisor, over recorded engines in real processes.

Two models, one loaded at a time (`max_loaded=1`): the service is ready with nothing loaded, a
cold request waits for its engine and is answered, a request for the other model stops the
first engine's process (it is gone) and starts its own, concurrent requests for both are each
answered or refused with 503 + Retry-After, and the shutdown leaves no engine behind. The same
with real llama-server engines and three models: tests/e2e/test_on_demand.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from inferd.catalog import Catalog
from inferd.server.app import create_app
from inferd.server.keys import KeyRing
from inferd.server.routing import Router, Table
from inferd.server.runtime import DrainingServer, make_server
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import State, Supervisor
from tests.integration.conftest import MODEL, RecordedEngine, settings

pytestmark = pytest.mark.integration
OTHER = "smollm2-copy"


def _served(tmp_path: Path, name: str, *, both: bool = False) -> ServedModel:
    entry = Catalog.load().get(MODEL).model_copy(update={"id": name})
    profile = entry.profile("vllm-cpu-bf16")
    assert profile is not None

    def supervisor(nice: int = 0) -> Supervisor:
        # Half a second to listen: a load the requests can be seen waiting for.
        engine = RecordedEngine(name, tmp_path, profile, ["--ready-after", "0.5"], tmp_path)
        return Supervisor(engine, ready_timeout_s=20, backoff_s=(0.2,), nice=nice)

    if not both:
        return ServedModel(entry, profile, supervisor(), "Apache License 2.0 (text)", {})
    # Two engines behind the model, the second started behind the first (as cpu-both's vLLM).
    speed = Table({128: 100.0}, {1: 10.0, 4: 20.0})
    return ServedModel(
        entry,
        profile,
        supervisor(),
        "Apache License 2.0 (text)",
        {},
        others=(Backend(profile, supervisor(nice=10)),),
        combined="cpu-both",
        router=Router([speed, speed]),
    )


class Service:
    def __init__(self, tmp_path: Path, *, both: bool = False) -> None:
        self.models = {n: _served(tmp_path, n, both=both and n == MODEL) for n in (MODEL, OTHER)}
        config = settings(tmp_path, max_loaded=1, load_timeout_s=20)
        app = create_app(list(self.models.values()), config, KeyRing(config.api_keys_file))
        self.server: DrainingServer = make_server(app, config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def chat(self, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=30)

    def states(self) -> dict[str, str]:
        data = httpx.get(self.url + "/v1/models", timeout=5).json()["data"]
        return {m["id"]: m["state"] for m in data}

    def engine(self, model: str) -> psutil.Process:
        pid = self.models[model].supervisor.pid
        assert pid is not None
        return psutil.Process(pid)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    yield s
    s.stop()


def _gone(proc: psutil.Process) -> bool:
    try:
        proc.wait(timeout=5)
    except psutil.TimeoutExpired:
        return False
    return True


def test_ready_empty_then_each_model_loads_on_its_request(service: Service) -> None:
    ready = httpx.get(service.url + "/v1/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"][MODEL]["load_state"] == "unloaded"
    assert service.states() == {MODEL: "unloaded", OTHER: "unloaded"}
    assert service.models[MODEL].supervisor.pid is None  # nothing started

    r = service.chat(MODEL)  # cold: waits for the engine
    assert r.status_code == 200, r.text
    assert service.states() == {MODEL: "loaded", OTHER: "unloaded"}
    first = service.engine(MODEL)

    r = service.chat(OTHER)  # room for one: the idle first model is stopped
    assert r.status_code == 200, r.text
    assert service.states() == {MODEL: "unloaded", OTHER: "loaded"}
    assert _gone(first)
    metrics = httpx.get(service.url + "/v1/metrics", timeout=5).text
    assert f'inferd_model_unloads_total{{model="{MODEL}",reason="evicted"}} 1.0' in metrics
    assert f'inferd_model_loads_total{{model="{OTHER}"}} 1.0' in metrics


def test_concurrent_requests_for_two_models_one_loaded(service: Service) -> None:
    order = [MODEL, OTHER] * 6
    with ThreadPoolExecutor(len(order)) as pool:
        answers = list(pool.map(service.chat, order))
    for r in answers:
        assert r.status_code == 200 or (r.status_code == 503 and r.headers["retry-after"]), r.text
    assert sum(r.status_code == 200 for r in answers) >= len(order) // 2
    assert list(service.states().values()).count("loaded") <= 1
    last = service.engine(OTHER if service.states()[OTHER] == "loaded" else MODEL)
    service.stop()
    assert _gone(last)  # the shutdown stops what is loaded


def test_both_engines_of_a_model_load_together_and_are_evicted_together(tmp_path: Path) -> None:
    service = Service(tmp_path, both=True)
    try:
        model = service.models[MODEL]
        later = model.others[0].supervisor
        for load in (1, 2):
            r = service.chat(MODEL)  # loaded once its first engine answers
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 20
            while later.state is not State.READY and time.monotonic() < deadline:
                time.sleep(0.05)  # the second engine starts behind it
            assert later.state is State.READY, later.describe()
            engines = [service.engine(MODEL), psutil.Process(later.pid)]
            assert service.chat(MODEL).status_code == 200

            r = service.chat(OTHER)  # room for one: both engines of the first are stopped
            assert r.status_code == 200, r.text
            assert service.states() == {MODEL: "unloaded", OTHER: "loaded"}
            assert all(_gone(e) for e in engines), f"load {load}: an engine outlived its unload"
            assert later.describe()["state"] == State.STOPPED.value
    finally:
        service.stop()
