"""OpenAI's Responses API and Anthropic's Messages API on a real `inferd serve`, on both engines
(the `server` fixture), driven by the official `openai` and `anthropic` SDKs and by LangChain's
clients of each: what an application written for either API does, unchanged."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.e2e.conftest import MODEL, Served

pytestmark = pytest.mark.e2e
ASK = "Name one colour."
# A JSON schema the answer must follow (constrained decoding on both engines).
COLOUR = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server: Served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


# ---------------------------------------------------------------------- Responses


def test_responses_create_retrieve_continue_delete(oai: openai.OpenAI) -> None:
    first = oai.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input=ASK,
        max_output_tokens=16,
        temperature=0,
        metadata={"app": "e2e"},
    )
    assert first.status in ("completed", "incomplete")
    assert first.output_text
    assert first.usage is not None and first.usage.input_tokens > 0
    assert 0 < first.usage.output_tokens <= 16
    assert first.metadata == {"app": "e2e"}
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    second = oai.responses.create(
        model=MODEL, input="And another?", previous_response_id=first.id, max_output_tokens=8
    )
    # The stored conversation is in the prompt: more input tokens than the question alone.
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)


def test_responses_stream(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=MODEL, input=ASK, max_output_tokens=12) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final.output_text and final.usage is not None and final.usage.output_tokens > 0


def test_responses_json_schema(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(
        model=MODEL,
        input="Pick a colour. Answer in JSON.",
        max_output_tokens=32,
        text={
            "format": {"type": "json_schema", "name": "colour", "schema": COLOUR, "strict": True}
        },
    )
    assert json.loads(reply.output_text)["colour"] in ("red", "green", "blue")


def test_responses_bad_input(oai: openai.OpenAI, server: Served) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert missing.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as web:
        oai.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert web.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad_schema:
        oai.responses.create(
            model=MODEL,
            input="hi",
            tools=[
                {
                    "type": "function",
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": 5}}},
                    "strict": False,
                }
            ],
        )
    assert bad_schema.value.body["param"] == "tools"  # type: ignore[index]
    r = httpx.post(server.url + "/v1/responses", content=b"{", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_langchain_responses_api(base_url: str) -> None:
    chat = ChatOpenAI(
        model=MODEL,
        base_url=base_url,
        api_key=SecretStr("unused"),
        use_responses_api=True,
        max_retries=0,
        max_completion_tokens=12,
    )
    reply = chat.invoke(ASK)
    assert reply.text
    streamed = "".join(chunk.text for chunk in chat.stream(ASK))
    assert streamed


# ---------------------------------------------------------------------- Messages


def test_messages_create_and_stream(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL,
        max_tokens=16,
        system="Answer in one short sentence.",
        messages=[{"role": "user", "content": ASK}],
        # Sampling fields older clients (and LangChain) send; this SDK has them no longer.
        extra_body={"temperature": 0, "top_k": 20},
    )
    assert message.role == "assistant" and message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 16
    with claude.messages.stream(
        model=MODEL, max_tokens=12, messages=[{"role": "user", "content": ASK}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens > 0


def test_messages_stop_sequences(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        stop_sequences=["5"],
        extra_body={"temperature": 0},
    )
    text = message.content[0].text if message.content[0].type == "text" else ""
    assert "5" not in text and "6" not in text
    assert message.stop_reason in ("stop_sequence", "end_turn")


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    short = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    long = claude.messages.count_tokens(
        model=MODEL,
        system="You are a helpful assistant.",
        messages=[{"role": "user", "content": "hi " * 50}],
    )
    assert 0 < short.input_tokens < long.input_tokens


def test_messages_bad_input(server: Served, claude: anthropic.Anthropic) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(server.url + "/v1/messages", json=body, timeout=30)

    r = post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]
    r = post(
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "hologram"}]}],
        }
    )
    assert r.status_code == 400 and "hologram" in r.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="input_schema"):
        claude.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"name": "f", "input_schema": {"type": "object", "properties": 3}}],
        )


def test_langchain_chat_anthropic(server: Served) -> None:
    chat = ChatAnthropic(  # type: ignore[call-arg]
        model_name=MODEL,
        base_url=server.url,
        api_key=SecretStr("unused"),
        max_tokens_to_sample=12,
        max_retries=0,
        timeout=120,
    )
    reply = chat.invoke(ASK)
    assert reply.text
    assert "".join(chunk.text for chunk in chat.stream(ASK))
