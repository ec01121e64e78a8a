"""Both CPU engines behind one model (`--profile cpu-both`): llama.cpp answers first, vLLM
starts behind it at a lower priority, paused while a user streams from llama.cpp, and joins;
the engines take turns: one user on llama.cpp, a crowd on vLLM with nothing refused, a request
only vLLM can serve goes there, and a crash of either engine leaves the other serving.

One real `inferd serve` for the module (the shared `server` fixture runs the API, tools and rails
tests on this profile too); requests through the real HTTP front with the OpenAI SDK.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from inferd.catalog import Catalog
from inferd.engines.llamacpp import LlamaCppEngine
from tests.e2e.conftest import (
    EAGER,
    INFERD,
    LLAMACPP_PROFILE,
    MODEL,
    START_TIMEOUT_S,
    Served,
    cache_path,
    cache_with_crowd_figures,
    engine_client,
    engine_socket,
    serving,
)

BOTH = "cpu-both"
# A function tool; with `tool_choice: required` only vLLM honours it here.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass
class Seen:
    """What was seen while vLLM started behind llama.cpp."""

    health_status: int = 0
    health: dict[str, Any] = field(default_factory=dict)
    nice_while_starting: set[int] = field(default_factory=set)
    policy_while_starting: set[int] = field(default_factory=set)
    # vLLM's process states while one user streams from llama.cpp, and once the stream is done.
    while_serving: set[str] = field(default_factory=set)
    after_serving: set[str] = field(default_factory=set)
    not_stopped: set[str] = field(default_factory=set)  # which, if any, ran while serving


def _engines(served: Served) -> dict[str, dict[str, Any]]:
    """Each engine as `/v1/metadata` shows it (state, requests given, share), by name."""
    meta = httpx.get(served.url + "/v1/metadata", timeout=10).json()
    return {e["name"]: e for e in meta["models"][0]["engines"]}


def _requests(served: Served) -> dict[str, int]:
    return {name: int(e["requests"]) for name, e in _engines(served).items()}


def _vllm_tree(served: Served) -> list[psutil.Process]:
    """vLLM's processes (its server once the launch shim has exec'd it, its engine core)."""
    found = []
    for p in served.descendants():
        try:
            line = " ".join(p.cmdline())
            if p.name().startswith("VLLM") or (
                "vllm.entrypoints" in line and "engines/launch.py" not in line
            ):
                found.append(p)
        except psutil.Error:
            continue
    return found


# The processes of one part of vLLM's way in, found among a server's descendants.
Tree = Callable[[Served], list[psutil.Process]]


def _wait_joined(served: Served, timeout: float = START_TIMEOUT_S) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _engines(served)["vllm"]["state"] == "ready":
            return time.monotonic()
        time.sleep(1)
    raise AssertionError(f"vLLM did not join in {timeout} s:\n{served.log_tail()}")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Seen]]:
    """The served profile, and what was seen while vLLM started behind llama.cpp."""
    root = tmp_path_factory.mktemp("both")
    args = ("--profile", BOTH, EAGER)
    with serving(root, *args, cache=cache_with_crowd_figures(root)) as served:
        health = httpx.get(served.url + "/v1/health/ready", timeout=10)
        seen = Seen(health.status_code, health.json())
        # vLLM starts niced; look while it starts (it takes tens of seconds).
        niced: set[int] = set()
        samples, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline and samples < 10:
            if _engines(served)["vllm"]["state"] == "ready":
                break  # given its priority back: what it had while starting is gone
            for p in _vllm_tree(served):
                try:
                    niced.add(p.nice())
                    seen.policy_while_starting.add(os.sched_getscheduler(p.pid))
                    samples += 1
                except psutil.Error:
                    continue
            time.sleep(0.2)
        seen.nice_while_starting = niced
        if _engines(served)["vllm"]["state"] != "ready":
            _stream_watching_vllm(served, seen)
        _wait_joined(served)
        yield served, seen


def _converter(served: Served) -> list[psutil.Process]:
    """The process converting vLLM's weights from the GGUF (`cache.convert`), while it runs."""
    found = []
    for p in served.descendants():
        with contextlib.suppress(psutil.Error):
            if "inferd.cache.convert" in p.cmdline():
                found.append(p)
    return found


def _statuses(served: Served, running: set[str] | None = None, tree: Tree = _vllm_tree) -> set[str]:
    """The states of vLLM's processes (or `tree`'s); those not stopped named in `running`."""
    found: set[str] = set()
    for p in tree(served):
        with contextlib.suppress(psutil.Error):
            found.add(p.status())
            if running is not None and p.status() != psutil.STATUS_STOPPED:
                running.add(f"{p.name()} pid {p.pid} pgid {os.getpgid(p.pid)}: {p.status()}")
    return found


def _stream_watching_vllm(served: Served, seen: Seen, tree: Tree = _vllm_tree) -> None:
    """One user's stream from llama.cpp while vLLM starts (or its weights are built: `tree`):
    vLLM's start is paused meanwhile (server.warmup), and goes on once the stream is done."""
    stream = _chat(served).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=96,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        # Not near the end: the front frees the slot (and vLLM goes on) once llama.cpp has
        # sent its last token, while the client is still reading the last events.
        if 4 <= i <= 64 and i % 8 == 0:
            seen.while_serving |= _statuses(served, seen.not_stopped, tree)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        not seen.after_serving or "stopped" in seen.after_serving
    ):
        time.sleep(0.2)
        seen.after_serving = _statuses(served, tree=tree)


def _chat(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=300)


def test_ready_on_the_first_engine_while_vllm_starts_niced(
    both: tuple[Served, Seen],
) -> None:
    served, seen = both
    assert seen.health_status == 200 and seen.health["status"] == "ready"
    states = {e["engine"]: e["state"] for e in seen.health["models"][MODEL]["engines"]}
    # (preparing: its weights are converted first where the shared test cache has none yet)
    assert states["llamacpp"] == "ready"
    assert states["vllm"] in {"stopped", "preparing", "starting"}
    assert seen.nice_while_starting and min(seen.nice_while_starting) >= 10
    assert seen.policy_while_starting == {os.SCHED_IDLE}
    # While a user streamed from llama.cpp, vLLM's start was stopped; then it went on.
    assert seen.while_serving == {psutil.STATUS_STOPPED}, seen
    assert seen.after_serving and psutil.STATUS_STOPPED not in seen.after_serving, seen
    # Ready now: both engines listed, vLLM given its normal priority back (the tests run as a
    # user allowed to raise it; elsewhere it stays niced, as the log says).
    assert {n: e["state"] for n, e in _engines(served).items()} == {
        "llamacpp": "ready",
        "vllm": "ready",
    }
    tree = [p for p in _vllm_tree(served) if p.is_running()]
    nice = {p.nice() for p in tree}
    policies = {os.sched_getscheduler(t.id) for p in tree for t in p.threads()}
    given_back = nice == {0} and policies == {os.SCHED_OTHER}
    assert given_back or "keeps its lower priority" in served.log.read_text()


def test_one_user_goes_to_llamacpp(both: tuple[Served, Seen]) -> None:
    served, _ = both
    before = _requests(served)
    answer = _chat(served).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert answer.choices[0].message.content
    after = _requests(served)
    assert after["llamacpp"] == before["llamacpp"] + 1 and after["vllm"] == before["vllm"]


def test_llamacpp_says_which_of_its_slots_work(both: tuple[Served, Seen], tmp_path: Path) -> None:
    """What a recalled request's slot waits for (`server.proxy._linger`): llama-server's own
    account of its busy slots, read as inferd reads it."""
    served, _ = both
    entry = Catalog.load().get(MODEL)
    profile = entry.profile(LLAMACPP_PROFILE)
    assert profile is not None
    engine = LlamaCppEngine(MODEL, tmp_path, profile, [], tmp_path)
    assert engine.working_path is not None
    with engine_client(*engine_socket(served, MODEL, "llamacpp")) as c:

        def working() -> int | None:
            return engine.working(c.get(engine.working_path or "").json())

        assert working() == 0
        stream = _chat(served).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=256,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))  # one user: llama.cpp answers
        assert working() == 1
        for _ in stream:
            pass
        deadline = time.monotonic() + 10
        while working() != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert working() == 0


def test_a_crowd_spills_over_to_vllm_and_nothing_is_refused(
    both: tuple[Served, Seen],
) -> None:
    served, _ = both
    before = _requests(served)
    recalled = _engines(served)["llamacpp"]["recalled"]
    client = _chat(served)

    def one(i: int) -> int:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell story {i} about a cat."}],
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens = 0
        for event in stream:
            if event.usage is not None:
                tokens = event.usage.completion_tokens
        return tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(one, range(16)))
    assert tokens == [48] * 16  # every stream whole: none refused, none cut when routed
    after = _requests(served)
    gained = {name: after[name] - before[name] for name in after}
    assert sum(gained.values()) == 16
    # The crowd is vLLM's. The burst is read whole before its second request is judged
    # (`Admission.gathered`); its first may have gone to llama.cpp as one user's, and then been
    # taken back by the arrival that showed the crowd unless llama.cpp had begun to answer it.
    # What llama.cpp answered is what it had begun: three at most (one to three users are its).
    taken_back = _engines(served)["llamacpp"]["recalled"] - recalled
    assert gained["vllm"] >= 13 and gained["llamacpp"] <= 3, (gained, taken_back)
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    for engine in ("llamacpp", "vllm"):
        assert f'inferd_engine_requests_total{{engine="{engine}",model="{MODEL}"}}' in metrics
        assert f'inferd_engine_recalls_total{{engine="{engine}",model="{MODEL}"}}' in metrics
        assert f'inferd_engine_ready{{engine="{engine}",model="{MODEL}"}} 1.0' in metrics


def _weather_call(served: Served) -> Any:
    """The tool calls of a chat with `tool_choice: required`, which only vLLM honours here."""
    weather: Any = WEATHER_TOOL
    answer = _chat(served).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        max_tokens=120,  # room for the whole call (a cut one is no call)
        temperature=0,
    )
    return answer.choices[0].message.tool_calls


def test_a_tool_choice_only_vllm_honours_goes_to_vllm(
    both: tuple[Served, Seen],
) -> None:
    served, _ = both
    before = _requests(served)
    calls = _weather_call(served)
    assert calls and calls[0].function.name == "get_weather"
    after = _requests(served)
    assert after["vllm"] == before["vllm"] + 1 and after["llamacpp"] == before["llamacpp"]
    # What neither engine honours is refused by name, as on one engine.
    weather: Any = WEATHER_TOOL
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        _chat(served).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[weather],
            tool_choice="auto",
            max_tokens=8,
        )


def test_a_crash_of_either_engine_leaves_the_other_serving(
    both: tuple[Served, Seen],
) -> None:
    served, _ = both
    client = _chat(served)
    for victim in ("llamacpp", "vllm"):
        engine = next(
            p
            for p in served.descendants()
            if (victim == "llamacpp" and p.name() == "llama-server")
            or (victim == "vllm" and "vllm.entrypoints" in " ".join(p.cmdline()))
        )
        engine.kill()
        engine.wait(30)
        time.sleep(1)  # the supervisor notices an exit within 0.2 s (until then it is routed to)
        # Until the supervisor restarts it, the other engine answers; readiness stays 200.
        for _ in range(3):
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
            )
            assert answer.choices[0].message.content is not None
        assert httpx.get(served.url + "/v1/health/ready", timeout=10).status_code == 200
        if victim == "vllm":
            # Being restarted (its start takes a minute: not waited for, the module ends here).
            assert _engines(served)[victim]["state"] in {"restarting", "starting", "ready"}
            assert (
                int(
                    httpx.get(served.url + "/v1/health/ready").json()["models"][MODEL]["engines"][
                        1
                    ]["restarts"]
                )
                == 1
            )
            continue
        deadline = time.monotonic() + START_TIMEOUT_S
        while _engines(served)[victim]["state"] != "ready":
            assert time.monotonic() < deadline, served.log_tail()
            time.sleep(1)


def test_the_dry_run_shows_both_engines(tmp_path: Path) -> None:
    out = subprocess.run(
        [INFERD, "serve", "--profile", BOTH, "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["profile"]["id"] == BOTH
    assert [e["name"] for e in info["engines"]] == ["llamacpp", "vllm"]


def _cache_without_vllm(root: Path) -> Path:
    """A cache as a first run finds it after llama.cpp's model is fetched: the suite's blobs and
    engine caches (linked) and its llama.cpp folders of the model (copied), no vLLM folder."""
    shared, cache = cache_path(), root / "cache"
    for name in ("blobs", "engines"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(shared / name)
    for folder in (shared / "models" / MODEL).glob("gguf-*"):
        shutil.copytree(folder, cache / "models" / MODEL / folder.name)
    return cache


def test_a_first_start_is_ready_before_vllms_weights_are_built(tmp_path: Path) -> None:
    """From a cache without vLLM's weights (a first run): ready as soon as llama.cpp answers,
    while vLLM's weights are converted behind it (niced, in the idle class, paused while a user
    streams); vLLM starts once they are built, and joins."""
    cache = _cache_without_vllm(tmp_path)
    built = cache / "models" / MODEL / "safetensors-bf16"
    with serving(tmp_path, "--profile", BOTH, EAGER, cache=cache) as served:
        # Ready; the conversion begins once the GGUF's hash is checked again, and is lowered
        # as soon as the front hears of it: looked for while vLLM is preparing.
        deadline, child = time.monotonic() + 60, None
        while child is None or child.nice() != 10:
            assert time.monotonic() < deadline, f"no conversion seen:\n{served.log_tail()}"
            assert _engines(served)["vllm"]["state"] == "preparing", served.log_tail()
            child = next(iter(_converter(served)), None)
            time.sleep(0.05)
        assert not built.exists()
        health = httpx.get(served.url + "/v1/health/ready", timeout=10)
        assert health.status_code == 200
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        seen = Seen()
        _stream_watching_vllm(served, seen, _converter)
        assert seen.while_serving == {psutil.STATUS_STOPPED}, seen
        assert seen.after_serving and psutil.STATUS_STOPPED not in seen.after_serving, seen
        _wait_joined(served)
        assert not child.is_running() and (built / "provenance.json").is_file()
        vllm = _engines(served)["vllm"]
        assert vllm["state"] == "ready" and not vllm.get("last_error")
        # The built weights serve: a request only vLLM honours here goes to it and is answered.
        before = _requests(served)["vllm"]
        calls = _weather_call(served)
        assert calls and calls[0].function.name == "get_weather"
        assert _requests(served)["vllm"] == before + 1
