"""inferd's answers, live from a real `inferd serve` on each engine, against OpenAI's document.

Every whole answer and every stream event of the OpenAI routes is validated with
tests/conformance.py against the schema OpenAI publishes for it (openai/openai-openapi; the
commit is in tests/fixtures/openai-openapi/README.md). Raw JSON is read with httpx rather than
through the openai client, whose models accept (and hide) missing or extra fields. The unit
tests (tests/unit/test_conformance.py) check the same over recorded engine answers; these check
that the front really applies it, on both engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conformance import assert_valid
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

CHAT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 12}
TEXT = {"prompt": "The capital of France is", "max_tokens": 8}
USAGE = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The stream's events as (SSE event name, parsed data); `[DONE]` as (None, "[DONE]")."""
    events: list[tuple[str | None, Any]] = []
    with http.stream("POST", path, json={"model": MODEL, **body}) as r:
        assert r.status_code == 200, r.read().decode()
        raw = b"".join(r.iter_bytes())
    for block in raw.decode().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                text = line.removeprefix("data:").strip()
                data = text if text == "[DONE]" else json.loads(text)
        if data is not None:
            events.append((name, data))
    assert events, "an empty stream"
    return events


@pytest.mark.parametrize(
    "extra", [{}, {"logprobs": True, "top_logprobs": 2}], ids=["plain", "logprobs"]
)
def test_chat_answer(http: httpx.Client, extra: dict[str, Any]) -> None:
    answer = post(http, "/chat/completions", {**CHAT, **extra})
    assert_valid("CreateChatCompletionResponse", answer)


@pytest.mark.parametrize(
    "extra", [{}, {"logprobs": True, "top_logprobs": 2}], ids=["plain", "logprobs"]
)
def test_chat_stream(http: httpx.Client, extra: dict[str, Any]) -> None:
    events = stream(http, "/chat/completions", {**CHAT, **USAGE, **extra})
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        assert_valid("CreateChatCompletionStreamResponse", data)
    assert events[-2][1]["choices"] == [] and events[-2][1]["usage"]


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}], ids=["plain", "logprobs"])
def test_completion_answer(http: httpx.Client, extra: dict[str, Any]) -> None:
    answer = post(http, "/completions", {**TEXT, **extra})
    assert_valid("CreateCompletionResponse", answer)


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}], ids=["plain", "logprobs"])
def test_completion_stream(http: httpx.Client, extra: dict[str, Any]) -> None:
    events = stream(http, "/completions", {**TEXT, **USAGE, **extra})
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        # The document has no schema for these events; see tests/conformance.py.
        assert_valid("CreateCompletionStreamResponse", data)
    finals = [d for _, d in events[:-1] if d["choices"] and d["choices"][0]["finish_reason"]]
    assert finals, "no event carries the finish reason"
    assert_valid("CreateCompletionResponse", finals[-1])


def test_models_list(http: httpx.Client) -> None:
    r = http.get("/models")
    assert r.status_code == 200, r.text
    assert_valid("ListModelsResponse", r.json())
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


def test_model(http: httpx.Client) -> None:
    r = http.get(f"/models/{MODEL}")
    assert r.status_code == 200, r.text
    assert_valid("Model", r.json())
    assert r.json()["id"] == MODEL


def test_responses_answer(http: httpx.Client) -> None:
    answer = post(http, "/responses", {"input": "Name three colors.", "max_output_tokens": 16})
    assert_valid("Response", answer)
    assert answer["status"] in ("completed", "incomplete")


def test_responses_stream(http: httpx.Client) -> None:
    body = {"input": "Name three colors.", "max_output_tokens": 16, "stream": True}
    events = stream(http, "/responses", body)
    assert all(data != "[DONE]" for _, data in events), "Responses streams end without [DONE]"
    for name, data in events:
        assert_valid("ResponseStreamEvent", data)
        assert name is None or name == data["type"]
    types = [data["type"] for _, data in events]
    assert types[0] == "response.created"
    assert types[-1] in ("response.completed", "response.incomplete")
    assert_valid("Response", events[-1][1]["response"])
