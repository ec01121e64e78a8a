"""Health, readiness, metadata and metrics of a real `inferd serve`, on each engine and on both
behind the one model (where each engine shows, with its share of the requests)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, VLLM_PROFILE, Served

pytestmark = pytest.mark.e2e
# Each engine's own count of generated tokens, under its own name.
GENERATED = {
    "llamacpp": "llamacpp:tokens_predicted_total",
    "vllm": "vllm:generation_tokens_total",
}


def test_live_while_starting_and_ready_only_once_the_engine_answers(server: Served) -> None:
    ready = [(code, body) for path, code, body in server.seen if path == "/v1/health/ready"]
    live = [code for path, code, _ in server.seen if path == "/v1/health/live"]
    # llama-server can be up before the first probe (it loads in well under a second); vLLM
    # never is. Whenever a probe came early, it must have said why it was not ready.
    if server.profile == VLLM_PROFILE:
        assert ready[0][0] == 503, "the first readiness probe should find vLLM still starting"
    for code, body in ready:
        if code == 503:
            state = json.loads(body)
            assert state["status"] == "not_ready"
            assert state["models"][MODEL]["state"] in ("starting", "restarting")
    assert [code for code, _ in ready].count(200) == 1 and ready[-1][0] == 200
    assert set(live) == {200}


def _metric(text: str, name: str, missing: float | None = None) -> float:
    """The value of MODEL's series `name`; `missing` if given and the series is not written."""
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{MODEL}"'):
            return float(line.rsplit(" ", 1)[1])
    if missing is not None:
        return missing
    raise AssertionError(f"{name} missing")


def _given(text: str) -> float:
    """Requests given to MODEL's engines, all of them (counted only where it has several)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferd_engine_requests_total{") and f'model="{MODEL}"' in line
    )


def test_metrics_rise_after_requests(server: Served, base_url: str) -> None:
    def scrape() -> str:
        return httpx.get(server.url + "/v1/metrics", timeout=30).text

    before = scrape()
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    client.chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    list(
        client.chat.completions.create(
            model=MODEL, max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
    )
    after = scrape()
    for name in (
        "prompt_tokens_total",
        "generation_tokens_total",
        "e2e_request_latency_seconds_count",
    ):
        assert _metric(after, name) > _metric(before, name, missing=0), name
    assert _metric(after, "time_to_first_token_seconds_count") >= 1
    assert _metric(after, "num_requests_running") == 0
    # Each engine's own metrics, passed through under its own prefix.
    for engine in server.engines:
        assert GENERATED[engine] in after, engine
    if len(server.engines) > 1:  # both requests given to one engine or the other
        assert _given(after) == _given(before) + 2


def test_metadata_names_model_profile_and_engine(server: Served) -> None:
    meta = httpx.get(server.url + "/v1/metadata", timeout=30).json()
    model = meta["models"][0]
    assert model["id"] == MODEL
    assert model["license"] == "apache-2.0"
    assert model["profile"]["id"] == meta["selectedModelProfileId"]
    assert model["profile"]["id"] == server.profile
    assert model["profile"]["tags"]["engine"] in server.engines
    assert model["engine"]["version"]
    # With several engines, each one with its profile, state and share of the requests.
    engines = model.get("engines", [model["engine"]])
    assert tuple(e["name"] for e in engines) == server.engines
    assert all(e["version"] and e["state"] == "ready" for e in engines), engines
    if len(server.engines) > 1:
        assert all(e["profile"] and 0 <= e["share"] <= 1 for e in engines), engines
    assert meta["inferd_version"]
    lic = httpx.get(server.url + "/v1/license", timeout=30).json()["licenses"][0]
    assert "Apache License" in lic["content"]


def test_no_engine_connection_is_retried_under_mixed_load(server: Served, base_url: str) -> None:
    """Eight clients, four of five requests streamed: none goes to the engine twice. llama-server
    closes the connection after every streamed answer; when streams went out on pooled
    connections, the next request often took the dead one and was sent again (43 of 240 such
    requests at eight clients, `inferd.server.engine_client`)."""
    before = server.log.read_text(errors="replace").count("retrying once")

    async def client(seed: int) -> None:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as ai:
            for i in range(6):
                prompt = f"Count to {seed * 10 + i}:"
                if i % 5:
                    stream = await ai.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=8, stream=True
                    )
                    assert [c async for c in stream]
                else:
                    answer = await ai.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
                    assert answer.choices

    async def crowd() -> None:
        await asyncio.gather(*(client(n) for n in range(8)))

    asyncio.run(crowd())
    retried = server.log.read_text(errors="replace").count("retrying once") - before
    assert retried == 0, server.log_tail()
