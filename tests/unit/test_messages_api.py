"""Anthropic Messages over chat completions: requests checked and translated, answers and streams
turned back and read by the official `anthropic` SDK (its pydantic types and its own stream
accumulator, over a mock transport), on recorded engine answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from inferd.errors import InvalidRequestError
from inferd.server.apis.messages import (
    MessagesTranslation,
    count_tokens_answer,
    engine_token_count,
    error_body,
    error_type,
)
from inferd.server.apis.messages_request import count_tokens_request
from inferd.server.apis.translation import SSE
from tests.conftest import FIXTURES

RECORDED = FIXTURES / "recorded" / "messages"
VLLM = FIXTURES / "vllm-0.32.0"
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "kelvin"]}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


def _body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    body.update(fields)
    return body


def _request(**fields: Any) -> dict[str, Any]:
    return MessagesTranslation(_body(**fields), "m").request()


def _refused(**fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        _request(**fields)
    return caught.value


def _json(name: str) -> dict[str, Any]:
    path = VLLM / name if (VLLM / name).exists() else RECORDED / name
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _chunks(path: Path) -> list[dict[str, Any]]:
    """The engine's chunks as the front hands them over: parsed, up to `[DONE]`."""
    chunks = []
    for event in path.read_text().split("\n\n"):
        data = event.removeprefix("data: ")
        if data.startswith("{"):
            chunks.append(json.loads(data))
    return chunks


def _stream(translation: MessagesTranslation, chunks: list[dict[str, Any]]) -> list[SSE]:
    events = translation.start()
    for chunk in chunks:
        events += translation.event(chunk)
    return events + translation.end()


# --- requests ---------------------------------------------------------------------------------


def test_plain_request_maps_every_sampling_field() -> None:
    chat = _request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        stop_sequences=["\n\nHuman:", "END"],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
        service_tier="auto",
        stream=True,
    )
    assert chat == {
        "model": "m",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {"role": "user", "content": "Hi"},
        ],
        "stop": ["\n\nHuman:", "END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_tool_history_becomes_tool_calls_and_tool_messages() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Lyon?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two calls", "signature": ""},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Lyon"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "18 C",
                    "cache_control": {"type": "ephemeral"},
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "is_error": True,
                    "content": [{"type": "text", "text": "no station"}],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    chat = _request(messages=messages, tools=[WEATHER])
    assert chat["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no station"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city.",
            },
        }
    ]
    assert "tool_choice" not in chat


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = _request(tools=[WEATHER, TIME], tool_choice=choice)
    assert {k: chat[k] for k in expected} == expected
    assert len(chat["tools"]) == 2
    assert "parallel_tool_calls" in chat or "parallel_tool_calls" not in expected


def test_a_named_tool_is_required_over_that_tool_alone() -> None:
    chat = _request(tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time"})
    assert chat["tool_choice"] == "required"
    assert [t["function"]["name"] for t in chat["tools"]] == ["get_time"]


def test_prefill_continues_the_assistant_turn() -> None:
    messages = [
        {"role": "user", "content": "Sun in Greek? (A) Sol (B) Helios"},
        {"role": "assistant", "content": "The answer is ("},
    ]
    chat = _request(messages=messages)
    assert chat["add_generation_prompt"] is False
    assert chat["continue_final_message"] is True
    assert chat["messages"][-1] == {"role": "assistant", "content": "The answer is ("}


@pytest.mark.parametrize(
    ("thinking", "enabled"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, True),
        ({"type": "adaptive"}, True),
        ({"type": "disabled"}, False),
    ],
)
def test_thinking_switches_the_template(thinking: dict[str, Any], enabled: bool) -> None:
    chat = _request(max_tokens=2048, thinking=thinking)
    assert chat["chat_template_kwargs"] == {"enable_thinking": enabled}
    assert "chat_template_kwargs" not in _request()


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"max_tokens": None}, "max_tokens", "max_tokens"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"container": "c"}, "container", "not supported"),
        ({"mcp_servers": []}, "mcp_servers", "MCP"),
        ({"frobnicate": 1}, "frobnicate", "unknown field"),
        ({"temperature": 1.5}, "temperature", "0 to 1"),
        ({"stream": "yes"}, "stream", "boolean"),
        ({"stop_sequences": "END"}, "stop_sequences", "list"),
        ({"metadata": {"email": "a@b"}}, "metadata.email", "unknown"),
        ({"service_tier": "priority"}, "service_tier", "auto"),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "user"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].type",
            "'image' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
            "messages[0].content[0].type",
            "'document' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
            "messages[0].content[0].type",
            "unknown content block type 'hologram'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
            "messages[0].content[0].x",
            "unknown field",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages[0].content[0].type",
            "cannot appear here",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    },
                ]
            },
            "messages",
            "tool_result",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools[0].type",
            "'web_search_20250305' is not supported",
        ),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type", "bash"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema", "type 'object'"),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "object", "required": "city"}}]},
            "tools[0].input_schema",
            "not a valid JSON Schema",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].name", "twice"),
        ({"tools": [{**WEATHER, "name": "no spaces"}]}, "tools[0].name", "match"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice.name",
            "'nope'",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "some"}}, "tool_choice.type", "auto"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 100}},
            "thinking.budget_tokens",
            "1024",
        ),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 1024}},
            "thinking.budget_tokens",
            "less than max_tokens",
        ),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    body = _body(**fields)
    if fields.get("max_tokens", 1) is None:
        del body["max_tokens"]
    with pytest.raises(InvalidRequestError) as caught:
        MessagesTranslation(body, "m").request()
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.status == 400


def test_the_schema_error_says_where() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "strin"}}}
    err = _refused(tools=[{"name": "f", "input_schema": schema}])
    assert '["properties"]["city"]["type"]' in err.message


# --- whole answers ----------------------------------------------------------------------------


def _answer(name: str, **fields: Any) -> dict[str, Any]:
    translation = MessagesTranslation(_body(**fields), "smollm2-135m-instruct")
    translation.request()
    answer = translation.answer(_json(name))
    Message.model_validate(answer)
    return answer


def test_vllm_answer_cut_by_max_tokens() -> None:
    answer = _answer("chat.json")
    assert answer["id"].startswith("msg_")
    assert answer["content"] == [
        {"type": "text", "text": "Here are three more - yellow is a secondary color used to"}
    ]
    assert (answer["stop_reason"], answer["stop_sequence"]) == ("max_tokens", None)
    assert answer["usage"] == {
        "input_tokens": 34,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_vllm_names_the_stop_sequence_it_matched() -> None:
    answer = _answer("vllm-stop.json", stop_sequences=["3.", "END"])
    assert (answer["stop_reason"], answer["stop_sequence"]) == ("stop_sequence", "3.")


def test_llamacpp_does_not_say_which_stop_sequence_matched() -> None:
    answer = _answer("llamacpp-stop.json", stop_sequences=["3."])
    assert answer["content"] == [{"type": "text", "text": "1. Red\n2. Blue\n"}]
    # The stop string did match, but llama-server's chat route only says "stop".
    assert (answer["stop_reason"], answer["stop_sequence"]) == ("end_turn", None)
    assert answer["usage"]["input_tokens"] == 23


def test_tool_calls_become_tool_use_blocks() -> None:
    answer = _answer("vllm-tools.json", tools=[WEATHER])
    assert answer["stop_reason"] == "tool_use"
    uses = answer["content"]
    assert [(b["type"], b["name"], b["input"]) for b in uses] == [
        ("tool_use", "get_weather", {"city": "Paris"}),
        ("tool_use", "get_weather", {"city": "Lyon"}),
    ]
    assert all(b["id"].startswith("toolu_") for b in uses)
    assert uses[0]["id"] != uses[1]["id"]


def test_reasoning_shows_only_when_thinking_is_enabled() -> None:
    hidden = _answer("llamacpp-tools.json", tools=[WEATHER])
    assert [b["type"] for b in hidden["content"]] == ["tool_use"]
    assert hidden["content"][0]["input"] == {"city": "Paris", "unit": "celsius"}
    shown = _answer(
        "llamacpp-tools.json",
        tools=[WEATHER],
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert shown["content"][0] == {
        "type": "thinking",
        "thinking": "The user wants the weather; call the tool.",
        "signature": "",
    }


def test_a_tool_call_cut_short_has_empty_input_and_stops_for_max_tokens() -> None:
    chat = _json("vllm-tools.json")
    chat["choices"][0]["finish_reason"] = "length"
    chat["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"] = '{"city": "Ly'
    answer = MessagesTranslation(_body(), "m").answer(chat)
    Message.model_validate(answer)
    assert answer["stop_reason"] == "max_tokens"
    assert answer["content"][1]["input"] == {}


def test_a_content_filter_finish_is_a_refusal() -> None:
    chat = _json("llamacpp-stop.json")
    chat["choices"][0]["finish_reason"] = "content_filter"
    answer = MessagesTranslation(_body(), "m").answer(chat)
    assert answer["stop_reason"] == "refusal"


# --- streams ----------------------------------------------------------------------------------


def _checked(events: list[SSE]) -> list[dict[str, Any]]:
    """Each event's data, after checking it against the SDK's event types and its name."""
    for sse in events:
        assert sse.event == sse.data["type"]
        if sse.event not in ("ping", "error"):
            EVENTS.validate_python(sse.data)
    return [sse.data for sse in events]


def test_vllm_text_stream() -> None:
    translation = MessagesTranslation(_body(stream=True), "smollm2-135m-instruct")
    data = _checked(_stream(translation, _chunks(VLLM / "chat-stream-usage.sse")))
    kinds = [d["type"] for d in data]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert data[0]["message"]["content"] == [] and data[0]["message"]["stop_reason"] is None
    text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    assert text.startswith("1. Blue:") and text.endswith(" colors with")
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert data[-2]["usage"]["output_tokens"] == 12
    assert data[-2]["usage"]["input_tokens"] == 34
    whole = translation.message()
    Message.model_validate(whole)
    assert whole["content"] == [{"type": "text", "text": text}]


def test_llamacpp_text_stream_splits_cached_prompt_tokens() -> None:
    translation = MessagesTranslation(_body(stream=True), "smollm2-135m-instruct")
    data = _checked(_stream(translation, _chunks(RECORDED / "llamacpp-stream.sse")))
    # The first chunk's `"content": null` opens no block.
    assert [d["type"] for d in data[:3]] == ["message_start", "ping", "content_block_start"]
    assert translation.message()["content"] == [
        {"type": "text", "text": "1. Red\n2. Blue\n3. Green"}
    ]
    assert data[-2]["delta"]["stop_reason"] == "end_turn"
    assert data[-2]["usage"] == {
        "input_tokens": 1,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 22,
    }


def test_message_delta_waits_for_the_usage_chunk() -> None:
    chunks = _chunks(VLLM / "chat-stream-usage.sse")
    translation = MessagesTranslation(_body(stream=True), "m")
    translation.start()
    before = [e for chunk in chunks[:-1] for e in translation.event(chunk)]
    assert before[-1].event == "content_block_stop"
    assert [e.event for e in translation.event(chunks[-1])] == ["message_delta", "message_stop"]
    assert translation.end() == []


def test_a_stream_without_usage_still_closes() -> None:
    chunks = _chunks(VLLM / "chat-stream-usage.sse")[:-1]
    data = _checked(_stream(MessagesTranslation(_body(stream=True), "m"), chunks))
    assert [d["type"] for d in data[-2:]] == ["message_delta", "message_stop"]
    assert data[-2]["usage"]["output_tokens"] == 0


def test_llamacpp_tool_stream_blocks_in_order() -> None:
    translation = MessagesTranslation(_body(stream=True, tools=[WEATHER, TIME]), "m")
    data = _checked(_stream(translation, _chunks(RECORDED / "llamacpp-stream-tools.sse")))
    starts = [d["content_block"] for d in data if d["type"] == "content_block_start"]
    assert [(b["type"], b.get("name")) for b in starts] == [
        ("text", None),
        ("tool_use", "get_weather"),
        ("tool_use", "get_time"),
    ]
    stops = [d["index"] for d in data if d["type"] == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert data[-2]["delta"]["stop_reason"] == "tool_use"
    whole = translation.message()
    assert [b.get("input") for b in whole["content"]] == [
        None,
        {"city": "Paris"},
        {"zone": "CET"},
    ]


def test_thinking_stream_blocks_end_with_a_signature() -> None:
    body = _body(stream=True, max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048})
    translation = MessagesTranslation(body, "m")
    data = _checked(_stream(translation, _chunks(RECORDED / "llamacpp-stream-tools.sse")))
    first = data[2]
    assert first["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    thinking = [d for d in data if d.get("index") == 0]
    assert thinking[-2]["delta"] == {"type": "signature_delta", "signature": ""}
    assert translation.message()["content"][0]["thinking"] == "The user wants the weather."


def test_error_event() -> None:
    translation = MessagesTranslation(_body(stream=True), "m")
    [event] = translation.error_event("engine went away", "server_error")
    assert event.encode() == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"api_error","message":"engine went away"}}\n\n'
    )
    [event] = translation.error_event("slow down", "overloaded_error")
    assert event.data["error"]["type"] == "overloaded_error"


# --- the official SDK, end to end -------------------------------------------------------------


def _sdk(engine: Path | str, seen: list[dict[str, Any]]) -> anthropic.Anthropic:
    """An `anthropic` client whose server is the translation replaying an engine answer."""

    def serve(request: httpx2.Request) -> httpx2.Response:
        payload = json.loads(request.content)
        translation = MessagesTranslation(payload, payload["model"])
        seen.append(translation.request())
        if payload.get("stream"):
            events = _stream(translation, _chunks(RECORDED / engine))
            body = b"".join(e.encode() for e in events)
            return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=translation.answer(_json(str(engine))))

    transport = httpx2.MockTransport(serve)
    return anthropic.Anthropic(
        base_url="http://inferd.test",
        api_key="k",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def test_sdk_stream_assembles_text_and_tool_inputs() -> None:
    seen: list[dict[str, Any]] = []
    client = _sdk("llamacpp-stream-tools.sse", seen)
    with client.messages.stream(
        model="qwen3-0.6b",
        max_tokens=256,
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": False},
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert seen[0]["stream"] is True and seen[0]["tool_choice"] == "required"
    assert "".join(texts) == "Let me check."
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (187, 11)


def test_sdk_stream_of_a_vllm_tool_call() -> None:
    client = _sdk("vllm-stream-tools.sse", [])
    with client.messages.stream(
        model="qwen3-0.6b",
        max_tokens=256,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_message()
    [use] = final.content
    assert use.type == "tool_use"
    assert use.input == {"city": "Paris", "unit": "celsius"}
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 198


def test_sdk_stream_of_real_llamacpp_text() -> None:
    client = _sdk("llamacpp-stream.sse", [])
    with client.messages.stream(
        model="smollm2-135m-instruct",
        max_tokens=12,
        system="Be brief.",
        messages=[{"role": "user", "content": "List three colors, numbered."}],
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == "1. Red\n2. Blue\n3. Green"  # type: ignore[union-attr]
    assert (final.stop_reason, final.stop_sequence) == ("end_turn", None)
    assert final.usage.input_tokens == 1
    assert final.usage.cache_read_input_tokens == 22
    assert final.usage.output_tokens == 12


def test_sdk_reads_a_whole_answer_and_sends_tool_results_back() -> None:
    seen: list[dict[str, Any]] = []
    client = _sdk("vllm-tools.json", seen)
    first = client.messages.create(
        model="qwen3-0.6b",
        max_tokens=256,
        messages=[{"role": "user", "content": "Weather in Paris and Lyon?"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    results: list[Any] = [
        {"type": "tool_result", "tool_use_id": u.id, "content": "18 C"} for u in uses
    ]
    client.messages.create(
        model="qwen3-0.6b",
        max_tokens=256,
        messages=[
            {"role": "user", "content": "Weather in Paris and Lyon?"},
            first.to_param(),
            {"role": "user", "content": results},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    call_ids = [c["id"] for c in seen[1]["messages"][1]["tool_calls"]]
    assert call_ids == [u.id for u in uses]
    assert [m["tool_call_id"] for m in seen[1]["messages"][2:]] == call_ids


def test_sdk_raises_on_an_error_event() -> None:
    translation = MessagesTranslation(_body(stream=True), "m")
    body = b"".join(e.encode() for e in translation.start())
    body += b"".join(e.encode() for e in translation.error_event("Overloaded", "overloaded_error"))

    def serve(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = anthropic.Anthropic(
        base_url="http://inferd.test",
        api_key="k",
        http_client=httpx2.Client(transport=httpx2.MockTransport(serve)),
        max_retries=0,
    )
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        client.messages.stream(model="m", max_tokens=8, messages=[]) as stream,
    ):
        stream.get_final_message()


# --- count_tokens and errors ------------------------------------------------------------------


def test_count_tokens_request_is_the_same_prompt() -> None:
    payload = {
        "model": "m",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    body = count_tokens_request(payload)
    prompt = MessagesTranslation({**payload, "max_tokens": 8}, "m").request()
    assert body == {
        "model": "m",
        "add_generation_prompt": True,
        "messages": prompt["messages"],
        "tools": prompt["tools"],
    }
    assert count_tokens_answer(17) == {"input_tokens": 17}


@pytest.mark.parametrize("field", ["max_tokens", "stream", "temperature", "metadata"])
def test_count_tokens_refuses_generation_fields(field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        count_tokens_request(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], field: 1}
        )
    assert caught.value.param == field


def test_engine_token_counts() -> None:
    assert engine_token_count(_json("tokenize.json")) == 2
    assert engine_token_count(_json("llamacpp-input-tokens.json")) == 188
    assert engine_token_count({"tokens": [1, 2, 3]}) == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types(status: int, kind: str) -> None:
    assert error_type(status) == kind
    assert error_body(status, "m") == {"type": "error", "error": {"type": kind, "message": "m"}}


def test_output_config_format_becomes_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    chat = _request(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    broken = {"type": "object", "properties": 3}
    for bad, param in (
        ({"effort": "high"}, "output_config.effort"),
        ({"format": {"type": "regex"}}, "output_config.format"),
        ({"format": {"type": "json_schema", "schema": broken}}, "output_config.format.schema"),
    ):
        assert _refused(output_config=bad).param == param
