"""The front in this process (real uvicorn, real HTTP) over a recorded engine in a real process."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.catalog import Catalog
from inferd.config import Settings, load_settings
from inferd.engines.base import Engine, EngineCommand
from inferd.engines.vllm import vllm_accepted_params
from inferd.guardrails.config import GuardrailsConfig
from inferd.server.app import create_app
from inferd.server.keys import KeyRing
from inferd.server.runtime import DrainingServer, make_server
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor

RECORDED = Path(__file__).with_name("recorded_engine.py")
MODEL = "smollm2-135m-instruct"


class RecordedEngine(Engine):
    """Replays vLLM 0.32.0, so it takes vLLM's request fields."""

    name = "recorded"

    def command(self, socket: Path) -> EngineCommand:
        return EngineCommand(
            [sys.executable, str(RECORDED), *self.listen_flags(socket), *self.extra_args]
        )

    def listen_flags(self, socket: Path) -> list[str]:
        return ["--uds", str(socket)]  # as vLLM's

    def secret_env(self, secret: str) -> dict[str, str]:
        return {"RECORDED_API_KEY": secret}  # required only with --require-key

    def accepted_params(self, route: str) -> frozenset[str] | None:
        return vllm_accepted_params(route)


def served_model(tmp_path: Path, *extra: str, backoff: tuple[float, ...] = (0.2,)) -> ServedModel:
    entry = Catalog.load().get(MODEL)
    profile = entry.profile("vllm-cpu-bf16")  # the recorded engine replays vLLM
    assert profile is not None
    engine = RecordedEngine(MODEL, tmp_path, profile, list(extra), tmp_path)
    supervisor = Supervisor(engine, ready_timeout_s=20, backoff_s=backoff)
    return ServedModel(entry, profile, supervisor, "Apache License 2.0 (text)", {"source": {}})


def settings(tmp_path: Path, **values: Any) -> Settings:
    values.setdefault("api_keys_file", tmp_path / "no-keys.json")
    values.setdefault("tune_in_background", False)  # no extra engines beside the tests'
    return load_settings(values, env={})


@dataclass
class Front:
    url: str
    served: ServedModel
    server: DrainingServer
    thread: threading.Thread
    client_options: dict[str, Any]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 10, **self.client_options, **kwargs})

    def engine(self) -> httpx.Client:
        """A client of the engine itself, on its Unix socket (without its key)."""
        socket = self.served.supervisor.socket
        assert socket is not None, "the engine was never started"
        transport = httpx.HTTPTransport(uds=str(socket))
        return httpx.Client(base_url="http://engine", transport=transport, timeout=10)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if c.get("/v1/health/ready").status_code == 200:
                    return
                time.sleep(0.05)
        raise AssertionError("front never became ready")


def start_front(
    served: ServedModel,
    config: Settings | None = None,
    guards: GuardrailsConfig | None = None,
    **client_options: Any,
) -> Front:
    config = config or load_settings({"tune_in_background": False}, env={})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    keys = KeyRing(config.api_keys_file)
    server = make_server(create_app([served], config, keys, guards), config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    scheme = "http" if config.ssl_mode == "disabled" else "https"
    return Front(f"{scheme}://127.0.0.1:{port}", served, server, thread, client_options)


def stop_front(front: Front) -> None:
    front.server.should_exit = True
    front.thread.join(timeout=30)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    f = start_front(served_model(tmp_path), settings(tmp_path))
    f.wait_ready()
    yield f
    stop_front(f)
