"""The reshaped front: OpenAI Responses and Anthropic Messages translated onto chat completions,
driven by the official SDKs through real HTTP against a recorded engine (real vLLM 0.32.0 bytes),
with keys (`x-api-key`), each API's error envelope, the Responses store, `models.retrieve`, and
the guardrails on the new routes. The same routes on real engines: tests/e2e/test_apis.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from inferd.guardrails import config as guard_config
from inferd.guardrails.rails import NO_TEXT
from inferd.server import routes
from inferd.server.keys import KeyFile
from inferd.server.routes import Route
from tests.integration.conftest import (
    MODEL,
    Front,
    served_model,
    settings,
    start_front,
    stop_front,
)

VLLM = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32.0"
# What the recorded engine answers, whole and streamed.
RECORDED_TEXT = json.loads((VLLM / "chat.json").read_text())["choices"][0]["message"]["content"]
STREAMED_TEXT = "".join(
    c["choices"][0]["delta"].get("content") or ""
    for c in (
        json.loads(line.removeprefix("data: "))
        for line in (VLLM / "chat-stream-usage.sse").read_text().splitlines()
        if line.startswith("data: {")
    )
    if c["choices"]
)


def _openai(front: Front, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url + "/v1", api_key=key, max_retries=0, timeout=20)


def _anthropic(front: Front, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=front.url, api_key=key, max_retries=0, timeout=20)


# ---------------------------------------------------------------------- the route table


def test_every_generation_route_declares_its_text() -> None:
    routes.check()
    undeclared = (Route("/v1/new", "/v1/chat/completions", NO_TEXT),)
    with pytest.raises(ValueError, match="generates text but says it has none"):
        routes.check(undeclared)
    with pytest.raises(ValueError, match="declares no text"):
        routes.check((Route("/v1/new", "/v1/embeddings", "somewhere"),))


def test_models_retrieve(front: Front) -> None:
    client = _openai(front)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


# ---------------------------------------------------------------------- Responses


def test_responses_create_retrieve_continue_delete(front: Front) -> None:
    client = _openai(front)
    first = client.responses.create(
        model=MODEL, input="hi", instructions="Be brief.", max_output_tokens=16
    )
    assert first.output_text == RECORDED_TEXT
    assert first.usage is not None and first.usage.input_tokens > 0
    assert client.responses.retrieve(first.id).output_text == RECORDED_TEXT
    follow = client.responses.create(model=MODEL, input="more", previous_response_id=first.id)
    assert follow.previous_response_id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # OpenAI's answer for a conversation it no longer has: 400 naming the field.
    with pytest.raises(openai.BadRequestError) as gone:
        client.responses.create(model=MODEL, input="again", previous_response_id=first.id)
    assert gone.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert gone.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_responses_stream_with_the_sdk(front: Front) -> None:
    client = _openai(front)
    with client.responses.stream(model=MODEL, input="hi") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output_text == STREAMED_TEXT
    assert final.usage is not None and final.usage.output_tokens > 0


def test_responses_refuse_what_they_cannot_honour(front: Front) -> None:
    client = _openai(front)
    with pytest.raises(openai.BadRequestError) as built_in:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert built_in.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as background:
        client.responses.create(model=MODEL, input="hi", background=True)
    assert background.value.body["param"] == "background"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=[{"type": "no_such_item"}])  # type: ignore[list-item, misc]


# ---------------------------------------------------------------------- Messages


def test_messages_create_stream_and_count(front: Front) -> None:
    client = _anthropic(front)
    message = client.messages.create(
        model=MODEL,
        max_tokens=16,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == RECORDED_TEXT
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    with client.messages.stream(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == STREAMED_TEXT and final.usage.output_tokens > 0
    counted = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens > 0


def test_messages_errors_in_anthropics_envelope(front: Front) -> None:
    client = _anthropic(front)
    with front.client() as c:
        r = c.post("/v1/messages", json={"model": MODEL, "messages": []})
        assert r.status_code == 400
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in body["error"]["message"]
        r = c.post("/v1/messages", content=b"{not json")
        assert r.status_code == 400 and r.json()["type"] == "error"
        r = c.post("/v1/messages", json={"model": "nope", "max_tokens": 4, "messages": []})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="block"):
        client.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "no_such_block"}]}],  # type: ignore[list-item, misc]
        )


def test_x_api_key_is_a_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key = KeyFile(keys_file).create("app", rpm=None, tpm=None)
    front = start_front(served_model(tmp_path), settings(tmp_path, api_keys_file=keys_file))
    front.wait_ready()
    try:
        with pytest.raises(anthropic.AuthenticationError):
            _anthropic(front, "wrong").messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        reply = _anthropic(front, key).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content
        with front.client() as c:
            by_header = c.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-api-key": key},
            )
            assert by_header.status_code == 200
    finally:
        stop_front(front)


# ---------------------------------------------------------------------- guardrails


def _guarded(tmp_path: Path) -> Front:
    rails = tmp_path / "rails.yaml"
    rails.write_text(
        "input:\n  pii: {action: redact}\noutput:\n  pii: {action: redact}\n", encoding="utf-8"
    )
    config = settings(tmp_path, log_requests=True)
    front = start_front(served_model(tmp_path), config, guard_config.load(rails))
    front.wait_ready()
    return front


def test_rails_apply_to_the_translated_routes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    front = _guarded(tmp_path)
    mail = "jane.doe@example.com"
    try:
        caplog.set_level("INFO", logger="inferd.requests")
        _openai(front).responses.create(model=MODEL, input=f"write to {mail}")
        _anthropic(front).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": f"mail {mail}"}]
        )
        bodies = [r.getMessage() for r in caplog.records if "request body" in r.getMessage()]
        assert len(bodies) == 2
        assert all(mail not in b and "[REDACTED:EMAIL]" in b for b in bodies)
        # Output rails read chat text, not tool-call arguments: tools are refused by name.
        with pytest.raises(anthropic.BadRequestError, match="tools"):
            _anthropic(front).messages.create(
                model=MODEL,
                max_tokens=8,
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"name": "f", "input_schema": {"type": "object"}}],
            )
    finally:
        stop_front(front)


def _events(raw: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data:"))
        for line in raw.splitlines()
        if line.startswith("data:") and line.strip() != "data: [DONE]"
    ]


def test_a_crashed_engine_ends_a_translated_stream_with_an_error(front: Front) -> None:
    crash = [{"role": "user", "content": "crash"}]
    with front.client(timeout=30) as c:
        r = c.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 8, "stream": True, "messages": crash},
        )
        kinds = [e.get("type") for e in _events(r.text)]
        assert kinds[0] == "message_start" and kinds[-1] == "error"
        front.wait_ready()  # the engine restarts after its crash
        r = c.post("/v1/responses", json={"model": MODEL, "stream": True, "input": "crash"})
        kinds = [e.get("type") for e in _events(r.text)]
        assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"]
