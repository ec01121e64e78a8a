"""A real `inferd serve` (real engines, real model from PyPI, real HTTP), shared by the suite.

The `server` fixture is parametrized over both engines' profiles for the default model (llama.cpp
latency, vLLM throughput) and over the profile that runs both behind the one model (`cpu-both`),
so every API and operations test shows each behaves the same through inferd, whichever engine
answers. vLLM starts slowly on a small CPU (about two minutes the first time, with
torch.compile), so one server per engine runs for the whole session. Their model cache is
`INFERD_TEST_CACHE_PATH` (default ~/.cache/inferd-tests), kept between runs so a second run skips
the download and conversion; CI starts empty and so exercises them. While a server starts, the
fixture records what the health routes answered, for the readiness tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from inferd.cache import ModelStore
from inferd.catalog import Catalog, hardware, measured

MODEL = "smollm2-135m-instruct"
LLAMACPP_PROFILE = "llamacpp-cpu-q8_0"
VLLM_PROFILE = "vllm-cpu-bf16"
# Both engines behind the model: llama.cpp first, vLLM joining behind it (catalog `combined`).
BOTH_PROFILE = "cpu-both"
# Tests that need vLLM itself (its engine-core child, its flags) start it by name.
VLLM = ("--profile", VLLM_PROFILE)
# vLLM without torch.compile, for servers that test inferd's behaviour rather than vLLM's speed:
# it starts in about 50 s instead of 90 (300 on a cold compile cache, as on CI). The shared
# `server[vllm]` and the benchmarks run vLLM compiled, as it is served.
EAGER = "--engine-args=vllm: --enforce-eager"
INFERD = str(Path(sys.executable).with_name("inferd"))
START_TIMEOUT_S = 900


@functools.cache
def catalog() -> Catalog:
    """The shipped catalog, read once (reading it parses every model's YAML)."""
    return Catalog.load()


def cache_path() -> Path:
    default = Path.home() / ".cache" / "inferd-tests"
    return Path(os.environ.get("INFERD_TEST_CACHE_PATH", default))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """One running `inferd serve` process and what was seen while it started."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    profile: str = "default"
    seen: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def engines(self) -> tuple[str, ...]:
        """The engines this server runs for MODEL, in start order (two for a combined profile),
        as the catalog names them; for servers started with `--profile ID` or `MODEL=ID`."""
        entry, profile_id = catalog().get(MODEL), self.profile.rpartition("=")[2]
        combined = entry.combination(profile_id)
        if combined is not None:
            return tuple(combined.engines)
        found = entry.profile(profile_id)
        assert found is not None, f"{self.profile} is not a profile of {MODEL}"
        return (found.engine,)

    def tool_choices(self, model: str = MODEL) -> frozenset[str]:
        """The `tool_choice` values this server honours for `model` ("function": a named one):
        with several engines, the union of theirs, since a request goes to one that honours it."""
        tools = catalog().get(model).tools
        if tools is None:
            return frozenset({"none"})
        return frozenset(c for e in self.engines for c in getattr(tools, e))

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"inferd exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                for path in ("/v1/health/live", "/v1/health/ready"):
                    try:
                        r = c.get(path)
                    except httpx.TransportError:
                        continue
                    self.seen.append((path, r.status_code, r.text))
                if self.seen and self.seen[-1][:2] == ("/v1/health/ready", 200):
                    return
                time.sleep(0.5)
        raise AssertionError(f"inferd not ready after {timeout} s:\n{self.log_tail()}")

    def wait_all_engines(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every engine of MODEL is ready: readiness is 200 once the first of several is,
        while the others still start (vLLM compiles for minutes); tests of the combined profile
        wait for both, so that either may answer. Not recorded in `seen` (the readiness tests
        read what was seen until the first 200)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"inferd exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    model = c.get("/v1/health/ready").json()["models"][MODEL]
                    states = {e["engine"]: e["state"] for e in model.get("engines", [model])}
                    if set(states) == set(self.engines) and set(states.values()) == {"ready"}:
                        return
                time.sleep(1)
        raise AssertionError(
            f"engines not all ready after {timeout} s: {states}\n{self.log_tail()}"
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in [*self.descendants(), psutil.Process(self.proc.pid)]:
                p.kill()
            raise


LLAMACPP_VARIANT = "gguf-q8_0"  # the cache folder of LLAMACPP_PROFILE


def cli(cache: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`inferd ARGS` on the cache `cache`, its output captured."""
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache)}
    return subprocess.run([INFERD, *args], env=env, capture_output=True, text=True, timeout=timeout)


def cache_with_model(root: Path) -> Path:
    """`root` made a cache of its own holding the default model's llama.cpp folder, copied
    from the suite's (pulled there first if need be), for tests that alter a cache."""
    source = cache_path() / "models" / MODEL / LLAMACPP_VARIANT
    if not source.is_dir():  # the suite's cache is filled by the first serve; fill it here
        done = cli(cache_path(), "cache", "pull", MODEL, "--profile", LLAMACPP_PROFILE, timeout=900)
        assert done.returncode == 0, done.stderr
    shutil.copytree(source, root / "models" / MODEL / LLAMACPP_VARIANT)
    return root


def cache_with_crowd_figures(root: Path) -> Path:
    """For a test of both engines behind the model (`cpu-both`) where a crowd must reach vLLM.
    A cache of the test's own: the shared test cache's models, blobs, adapters and engine caches
    (linked), and speed figures for this machine that are the catalog's first reference (a Zen
    4's: vLLM's steps nearly flat, so a crowd goes to vLLM). The routing tested is then the same
    on every CPU; on an AVX2-only CPU the catalog's own figures for it (and `inferd tune`) keep
    every load on llama.cpp, which `tests/unit/test_routing.py` covers."""
    shared = cache_path()
    cache = root / "cache"
    cache.mkdir()
    for name in ("blobs", "models", "adapters", "engines", "locks", "tmp"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(shared / name)
    fp = measured.fingerprint(hardware.detect())
    store = ModelStore(cache)
    for profile in Catalog.load().get(MODEL).profiles:
        if profile.references and profile.requires.device == "cpu":
            ref = profile.references[0]
            figures = measured.Measurement(
                MODEL, profile.id, profile.engine, fp.id, ref.prompt_ms, ref.step_ms, 1.0,
                "2026-12-02T00:00:00+00:00",
            )  # fmt: skip
            measured.save(store, figures, fp.description)
    return cache


def engine_socket(
    served: Served, model: str = MODEL, engine: str | None = None
) -> tuple[Path, str]:
    """Where `model`'s engine (of several, the one named `engine`) listens (its Unix socket, as
    inferd logged its last start) and the secret key inferd gave that start (read from the
    engine's environment, as only a process of the same user can)."""
    log = served.log.read_text(errors="replace")
    name = re.escape(engine) if engine else r"\S+"
    found = re.findall(rf"starting {name} engine for {re.escape(model)} on (\S+\.sock)", log)
    assert found, served.log_tail()
    for proc in served.descendants():
        with contextlib.suppress(psutil.Error):
            if found[-1] in proc.cmdline():
                env = proc.environ()
                key = env.get("LLAMA_API_KEY") or env.get("VLLM_API_KEY")
                if key:
                    return Path(found[-1]), key
    raise AssertionError(f"no engine process with its key listens on {found[-1]}")


def engine_sockets(served: Served) -> dict[str, tuple[Path, str]]:
    """`engine_socket` of each engine MODEL runs on `served`, by engine name."""
    return {engine: engine_socket(served, MODEL, engine) for engine in served.engines}


def engine_client(socket: Path, key: str | None = None) -> httpx.Client:
    """A client of an engine on its socket, with `key` (or none). Every request on a connection
    of its own: the engines close idle connections after 5 s, and a request sent on one at the
    moment it closes fails with "Server disconnected" (seen once on CI). inferd's own engine
    link retries those on a fresh connection; a test's client has no such retry."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    fresh = httpx.Limits(max_keepalive_connections=0)
    transport = httpx.HTTPTransport(uds=str(socket), limits=fresh)
    return httpx.Client(base_url="http://engine", transport=transport, headers=headers, timeout=60)


def start(tmp: Path, *args: str, cache: Path | None = None) -> Served:
    port = free_port()
    log = tmp / f"inferd-{port}.log"
    # No background tuning (server.tuning): it would start extra engines beside the tests'.
    env = {
        **os.environ,
        "INFERD_CACHE_PATH": str(cache or cache_path()),
        "INFERD_TUNE_IN_BACKGROUND": "0",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [INFERD, "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    profile = args[args.index("--profile") + 1] if "--profile" in args else "default"
    return Served(proc, port, log, profile)


@contextlib.contextmanager
def serving(tmp: Path, *args: str, cache: Path | None = None) -> Iterator[Served]:
    """`inferd serve ARGS`, ready, stopped afterwards (on the shared test cache, or `cache`)."""
    served = start(tmp, *args, cache=cache)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@pytest.fixture(
    scope="session",
    params=[LLAMACPP_PROFILE, VLLM_PROFILE, BOTH_PROFILE],
    ids=["llamacpp", "vllm", "both"],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    args = ("--profile", request.param, *((EAGER,) if request.param == BOTH_PROFILE else ()))
    with serving(tmp_path_factory.mktemp("serve"), *args) as served:
        served.wait_all_engines()
        yield served


@pytest.fixture(scope="session")
def base_url(server: Served) -> str:
    return server.url + "/v1"
