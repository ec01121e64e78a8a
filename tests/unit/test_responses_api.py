"""The Responses API translation: requests onto chat completions, chat answers and streams (recorded
engine bytes) back into Responses, each checked by the official `openai` SDK's own models, stream
accumulator and client; refusals by name; the response store and `previous_response_id`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import httpx2 as httpx  # the HTTP library of this openai SDK
import pytest
from openai import OpenAI, omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import FunctionToolParam, Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from inferd.errors import InvalidRequestError, NotFoundError, PreviousResponseNotFoundError
from inferd.server.apis.response_store import ResponseStore
from inferd.server.apis.responses import (
    ResponsesTranslation,
    delete,
    retrieve,
)
from inferd.server.apis.translation import SSE
from tests.conformance import assert_valid
from tests.conftest import FIXTURES

RECORDED = FIXTURES / "recorded" / "responses"
VLLM = FIXTURES / "vllm-0.32.0"
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _translation(kept: ResponseStore | None = None, /, **payload: Any) -> ResponsesTranslation:
    payload = {"model": "m", "input": "Hello", **payload}
    return ResponsesTranslation(payload, "m", kept if kept is not None else ResponseStore())


def _chunks(path: Path) -> list[dict[str, Any]]:
    """The chat chunks of a recorded stream, as the relay hands them over (not [DONE])."""
    chunks = []
    for raw in path.read_text().split("\n\n"):
        data = raw.strip().removeprefix("data:").strip()
        if data and data != "[DONE]":
            chunks.append(json.loads(data))
    return chunks


def _stream(translation: ResponsesTranslation, path: Path) -> list[SSE]:
    translation.request()
    events = translation.start()
    for chunk in _chunks(path):
        events += translation.event(chunk)
    return events + translation.end()


def _checked(events: list[SSE]) -> list[Any]:
    """Every event parsed by the SDK's union, named as its type, numbered from 0 without gaps;
    then fed through the SDK's own stream accumulator (what `client.responses.stream` uses)."""
    parsed = [EVENTS.validate_python(e.data) for e in events]
    for e in events:
        assert_valid("ResponseStreamEvent", e.data)  # OpenAI's published document
    assert [e.event for e in events] == [e.data["type"] for e in events]
    assert [p.sequence_number for p in parsed] == list(range(len(events)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in parsed:
        state.handle_event(event)
    return parsed


def _text_deltas(events: list[SSE], kind: str = "response.output_text.delta") -> str:
    return "".join(e.data["delta"] for e in events if e.event == kind)


# The request.


def test_plain_string_input_with_settings() -> None:
    t = _translation(
        instructions="Be brief.",
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        metadata={"team": "search"},
        user="u-1",
    )
    assert t.request() == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
    }


def test_every_chat_field_maps_back_to_a_client_field() -> None:
    chat = _translation(max_output_tokens=5, text={"format": {"type": "json_object"}}).request()
    renamed = set(chat) - {"model", "temperature", "top_p", "tools", "tool_choice"}
    assert renamed <= ResponsesTranslation.client_params.keys()


def test_stream_asks_the_engine_for_usage() -> None:
    chat = _translation(stream=True).request()
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_input_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "12 C"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "9 C"}],
        },
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
    ]
    calls = [
        {"id": c, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for c in ("c1", "c2")
    ]
    chat = _translation(input=items, stream=True).request()
    assert_valid("CreateChatCompletionRequest", chat)  # OpenAI's published document
    assert chat["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        # The assistant's text and its parallel calls are one chat turn.
        {"role": "assistant", "content": "Bonjour", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "9 C"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]


def test_tools_tool_choice_and_text_format() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    t = _translation(
        tools=[{**TOOL, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}},
    )
    chat = t.request()
    assert_valid("CreateChatCompletionRequest", chat)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": TOOL["description"],
                "parameters": TOOL["parameters"],
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema, "strict": True},
    }
    answer = t.answer({"choices": [{"message": {"content": '{"answer": "x"}'}}]})
    echoed = _validated(answer)
    assert echoed.text is not None and echoed.text.format is not None
    assert echoed.text.format.type == "json_schema"
    assert answer["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert answer["tools"][0]["strict"] is True and answer["parallel_tool_calls"] is False


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_tool_choice_strings_pass(choice: str) -> None:
    assert _translation(tools=[TOOL], tool_choice=choice).request()["tool_choice"] == choice


def test_text_formats() -> None:
    json_object = _translation(text={"format": {"type": "json_object"}}).request()
    assert json_object["response_format"] == {"type": "json_object"}
    assert "response_format" not in _translation(text={"format": {"type": "text"}}).request()


@pytest.mark.parametrize(
    ("fields", "param", "named"),
    [
        ({"temprature": 1}, "temprature", "temprature"),
        ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools", "file_search"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools", "code_interpreter"),
        ({"tools": [{"type": "computer_use_preview"}]}, "tools", "computer_use_preview"),
        ({"tools": [{**TOOL, "defer_loading": True}]}, "tools", "defer_loading"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "include"),
        ({"background": True}, "background", "background"),
        ({"truncation": "auto"}, "truncation", "truncation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "prompt"),
        ({"conversation": "conv_1"}, "conversation", "conversation"),
        ({"service_tier": "flex"}, "service_tier", "service_tier"),
        ({"top_logprobs": 3}, "top_logprobs", "top_logprobs"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "16"),
        ({"metadata": {"k": 1}}, "metadata", "metadata"),
        ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
        ({"max_output_tokens": True}, "max_output_tokens", "max_output_tokens"),
        ({"temperature": "hot"}, "temperature", "temperature"),
        ({"store": "yes"}, "store", "store"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options", "stream=true"),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "required"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name", "name"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "grammar"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "verbosity"),
        ({"input": 3}, "input", "input"),
        ({"input": []}, "input", "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
            "input_image",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "item_reference"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
            "arguments",
        ),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str, named: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _translation(**fields).request()
    assert caught.value.param == param and named in caught.value.message
    assert caught.value.status == 400


def test_missing_input_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="input is required"):
        ResponsesTranslation({"model": "m"}, "m", ResponseStore()).request()


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning": None, "include": [], "background": False, "truncation": "disabled"},
        {"service_tier": "auto", "top_logprobs": 0, "prompt": None, "conversation": None},
        {"stream": True, "stream_options": {"include_obfuscation": True}},
        {"safety_identifier": "h", "prompt_cache_key": "k", "prompt_cache_retention": "24h"},
        {"max_tool_calls": 3, "store": False, "text": {"format": None, "verbosity": None}},
    ],
)
def test_harmless_settings_are_accepted(fields: dict[str, Any]) -> None:
    _translation(**fields).request()


def test_unknown_previous_response_is_openais_400() -> None:
    with pytest.raises(PreviousResponseNotFoundError) as caught:
        _translation(previous_response_id="resp_gone").request()
    err = caught.value
    assert (err.status, err.type, err.code, err.param) == (
        400,
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )
    assert "resp_gone" in err.message


# Whole answers.


def _validated(answer: dict[str, Any]) -> Response:
    """The answer as the SDK reads it, checked against OpenAI's published document too, and
    with the request's settings echoed (the schema requires few of them)."""
    assert_valid("Response", answer)
    response = Response.model_validate(answer)
    echoed = ("previous_response_id", "max_output_tokens", "text", "truncation", "store")
    for name in echoed:
        assert name in answer, name
    return response


def test_vllm_answer_stopped_by_max_tokens_is_incomplete() -> None:
    chat = json.loads((VLLM / "chat.json").read_text())
    t = _translation(max_output_tokens=12)
    answer = t.answer(chat)
    response = _validated(answer)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert answer["output"][0]["status"] == "incomplete"
    assert answer["usage"] == {
        "input_tokens": 34,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 46,
    }
    assert answer["id"].startswith("resp_") and answer["output"][0]["id"].startswith("msg_")
    assert (answer["max_output_tokens"], answer["completed_at"]) == (12, None)


def test_llamacpp_answer_is_completed() -> None:
    chat = json.loads((RECORDED / "llamacpp-chat.json").read_text())
    answer = _translation(metadata={"k": "v"}).answer(chat)
    response = _validated(answer)
    assert response.status == "completed" and response.completed_at is not None
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert answer["metadata"] == {"k": "v"} and answer["store"] is True


def test_llamacpp_tool_call_answer() -> None:
    chat = json.loads((RECORDED / "llamacpp-tool-call.json").read_text())
    answer = _translation(tools=[TOOL], tool_choice="required").answer(chat)
    response = _validated(answer)
    calls = [item for item in response.output if item.type == "function_call"]
    engine_call = chat["choices"][0]["message"]["tool_calls"][0]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].call_id == engine_call["id"] and calls[0].id and calls[0].id.startswith("fc_")
    assert json.loads(calls[0].arguments) == json.loads(engine_call["function"]["arguments"])
    assert answer["tool_choice"] == "required" and answer["tools"][0]["name"] == "get_weather"


def test_reasoning_answer_has_a_reasoning_item_first() -> None:
    chat = json.loads((RECORDED / "llamacpp-reasoning.json").read_text())
    response = _validated(_translation().answer(chat))
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content
    assert reasoning.content[0].text == chat["choices"][0]["message"]["reasoning_content"]


def test_empty_answer_still_has_a_message() -> None:
    chat = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}
        ]
    }
    response = _validated(_translation().answer(chat))
    assert response.output_text == "" and response.usage is None


# Streams.


def test_vllm_stream_stopped_by_max_tokens() -> None:
    events = _stream(
        _translation(stream=True, max_output_tokens=12), VLLM / "chat-stream-usage.sse"
    )
    _checked(events)
    kinds = [e.event for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(events[-1].data["response"])
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in _chunks(VLLM / "chat-stream-usage.sse")
        if c["choices"]
    )
    assert final.output_text == text == _text_deltas(events)
    assert final.usage is not None and final.usage.output_tokens == 12
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"


def test_llamacpp_stream_completes_through_the_sdk_accumulator() -> None:
    t = _translation(stream=True)
    events = _stream(t, RECORDED / "llamacpp-chat-stream.sse")
    parsed = _checked(events)
    assert parsed[-1].type == "response.completed"
    final = Response.model_validate(events[-1].data["response"])
    assert final.status == "completed" and final.output_text == _text_deltas(events)
    assert final.usage is not None and final.usage.total_tokens > 0
    assert t.response == events[-1].data["response"]
    assert t.event(_chunks(RECORDED / "llamacpp-chat-stream.sse")[1]) == [] and t.end() == []
    assert t.error_event("late", "api_error") == []
    created = events[0].data["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == final.id


def test_llamacpp_tool_call_stream() -> None:
    events = _stream(
        _translation(stream=True, tools=[TOOL]), RECORDED / "llamacpp-tool-call-stream.sse"
    )
    _checked(events)
    final = Response.model_validate(events[-1].data["response"])
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    arguments = _text_deltas(events, "response.function_call_arguments.delta")
    assert calls[0].arguments == arguments and json.loads(arguments)["city"]
    done = [e for e in events if e.event == "response.function_call_arguments.done"]
    assert done[0].data["arguments"] == arguments and done[0].data["name"] == "get_weather"


def test_reasoning_stream() -> None:
    events = _stream(_translation(stream=True), RECORDED / "llamacpp-reasoning-stream.sse")
    _checked(events)
    final = Response.model_validate(events[-1].data["response"])
    assert [item.type for item in final.output] == ["reasoning", "message"]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content
    assert reasoning.content[0].text == _text_deltas(events, "response.reasoning_text.delta")
    assert final.output_text == _text_deltas(events)
    kinds = [e.event for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")


def test_text_then_parallel_calls_in_one_stream() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def call(index: int, **function: str) -> dict[str, Any]:
        return {
            "tool_calls": [
                {
                    "index": index,
                    "id": f"call_{index}" if "name" in function else None,
                    "type": "function",
                    "function": function,
                }
            ]
        }

    t = _translation(stream=True, tools=[TOOL])
    t.request()
    events = t.start()
    for c in [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk(call(0, name="get_weather", arguments="")),
        chunk(call(0, arguments='{"city": "Paris"}')),
        chunk(call(1, name="get_weather", arguments='{"city": ')),
        chunk(call(1, arguments='"Oslo"}')),
        chunk({}, "tool_calls"),
        {
            **head,
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        },
    ]:
        events += t.event(c)
    events += t.end()
    _checked(events)
    final = Response.model_validate(events[-1].data["response"])
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    args = [item.arguments for item in final.output if item.type == "function_call"]
    assert args == ['{"city": "Paris"}', '{"city": "Oslo"}']
    assert [item.call_id for item in final.output if item.type == "function_call"] == [
        "call_0",
        "call_1",
    ]
    assert final.status == "completed"


def test_stream_stopped_by_an_output_rail_is_incomplete() -> None:
    t = _translation(stream=True)
    t.request()
    events = t.start()
    events += t.event({"choices": [{"index": 0, "delta": {"content": "My card is"}}]})
    events += t.event(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "\n[answer stopped]"},
                    "finish_reason": "content_filter",
                }
            ]
        }
    )
    events += t.end()
    _checked(events)
    assert events[-1].event == "response.completed"
    assert events[-1].data["response"]["status"] == "incomplete"
    assert events[-1].data["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_empty_stream_still_has_a_message() -> None:
    t = _translation(stream=True)
    t.request()
    events = (
        t.start()
        + t.event(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": "stop",
                    }
                ]
            }
        )
        + t.end()
    )
    _checked(events)
    assert Response.model_validate(events[-1].data["response"]).output_text == ""


def test_error_midway_ends_with_response_failed() -> None:
    t = _translation(stream=True)
    t.request()
    events = t.start() + t.event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    events += t.error_event("the engine stopped mid-stream", "api_error")
    # The relay may still pass the engine's [DONE] on: nothing follows response.failed.
    assert t.end() == [] and t.error_event("again", "api_error") == []
    assert t.event({"choices": [{"index": 0, "delta": {"content": "lo"}}]}) == []
    parsed = [EVENTS.validate_python(e.data) for e in events]
    assert [p.sequence_number for p in parsed] == list(range(len(events)))
    assert [e.event for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].data["message"] == "the engine stopped mid-stream"
    failed = Response.model_validate(events[-1].data["response"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == "the engine stopped mid-stream"
    assert failed.output_text == "Hel"


def test_sse_encoding_names_each_event() -> None:
    first = _translation(stream=True).start()[0].encode()
    assert first.startswith(b"event: response.created\ndata: {")
    assert first.endswith(b"\n\n") and b'"sequence_number":0' in first


# The official client, end to end over HTTP bytes (no process: an httpx mock transport plays the
# front, translating a recorded engine stream).


def _front(path: Path, store: ResponseStore) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=retrieve(store, request.url.path.rsplit("/", 1)[1]))
        payload = json.loads(request.content)
        t = ResponsesTranslation(payload, payload["model"], store)
        t.request()
        if not t.stream:
            answer = t.answer(json.loads(path.read_text()))
            t.finished(answer)
            return httpx.Response(200, json=answer)
        events = t.start()
        for chunk in _chunks(path):
            events += t.event(chunk)
        events += t.end()
        assert t.response is not None
        t.finished(t.response)
        body = b"".join(e.encode() for e in events)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def _client(path: Path, store: ResponseStore) -> OpenAI:
    http = httpx.Client(transport=_front(path, store))
    return OpenAI(api_key="k", base_url="http://inferd.test/v1", http_client=http)


def test_openai_client_streams_and_retrieves() -> None:
    store = ResponseStore()
    client = _client(RECORDED / "llamacpp-chat-stream.sse", store)
    with client.responses.stream(model="m", input="Name a city.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_openai_client_tool_call_stream() -> None:
    client = _client(RECORDED / "llamacpp-tool-call-stream.sse", ResponseStore())
    with client.responses.stream(
        model="m", input="Weather in Paris?", tools=[cast(FunctionToolParam, TOOL)]
    ) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"]


def test_openai_client_whole_answer() -> None:
    client = _client(RECORDED / "llamacpp-chat.json", ResponseStore())
    response = client.responses.create(model="m", input="Name a city.", store=False)
    assert response.output_text and response.to_dict()["store"] is False


# Storage and previous_response_id.


def test_previous_response_continues_the_conversation() -> None:
    store = ResponseStore()
    first = _translation(store, input="Weather in Paris?", instructions="Use tools.", tools=[TOOL])
    first.request()
    answer = first.answer(json.loads((RECORDED / "llamacpp-tool-call.json").read_text()))
    first.finished(answer)
    call = answer["output"][-1]
    second = _translation(
        store,
        previous_response_id=answer["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "12 C"}],
        instructions="Answer in one line.",
    )
    assert second.request()["messages"] == [
        # The new instructions, not the previous ones (OpenAI does not carry them over).
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["call_id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["call_id"], "content": "12 C"},
    ]
    chat = json.loads((RECORDED / "llamacpp-chat.json").read_text())
    echoed = second.answer(chat)
    assert echoed["previous_response_id"] == answer["id"]
    assert echoed["instructions"] == "Answer in one line."
    second.finished(echoed)
    # A chain: the third turn sees the whole conversation, each answer in its place.
    third = _translation(store, previous_response_id=echoed["id"], input="Thanks!")
    messages = third.request()["messages"]
    assert messages[:-2] == second.request()["messages"][1:]
    assert messages[-2:] == [
        {"role": "assistant", "content": chat["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Thanks!"},
    ]


def test_store_false_is_not_stored_and_get_delete() -> None:
    store = ResponseStore()
    t = _translation(store, store=False)
    t.request()
    t.finished(t.answer(json.loads((RECORDED / "llamacpp-chat.json").read_text())))
    assert len(store) == 0
    t = _translation(store)
    t.request()
    answer = t.answer(json.loads((RECORDED / "llamacpp-chat.json").read_text()))
    t.finished(answer)
    assert retrieve(store, answer["id"]) == answer
    assert delete(store, answer["id"]) == {
        "id": answer["id"],
        "object": "response",
        "deleted": True,
    }
    for op in (retrieve, delete):
        with pytest.raises(NotFoundError) as caught:
            op(store, answer["id"])
        assert caught.value.status == 404 and caught.value.type == "invalid_request_error"


def _response(n: int, size: int = 10) -> dict[str, Any]:
    return {"id": f"resp_{n}", "object": "response", "pad": "x" * size}


def test_store_evicts_the_oldest_stored_by_count() -> None:
    store = ResponseStore(max_entries=2)
    for n in range(3):
        assert store.put(_response(n), [{"role": "user", "content": str(n)}])
    assert "resp_0" not in store and store.get("resp_1") is not None and len(store) == 2
    store.get("resp_1")  # reading does not refresh: storing order decides
    store.put(_response(3), [])
    assert "resp_1" not in store and "resp_2" in store


def test_store_evicts_by_bytes_and_refuses_one_too_big() -> None:
    store = ResponseStore(max_entries=100, max_bytes=200)
    # Each entry is about 85 bytes of JSON: two fit, a third evicts the first.
    assert store.put(_response(0, 40), []) and store.put(_response(1, 40), [])
    assert len(store) == 2 and store.put(_response(2, 40), [])
    assert "resp_0" not in store and store.bytes <= 200
    assert not store.put(_response(3, 500), [])
    assert "resp_3" not in store and len(store) == 2
    assert store.delete("resp_1") and not store.delete("resp_1")
    assert store.bytes == store.get("resp_2").size  # type: ignore[union-attr]


def test_store_keeps_its_own_copy_and_replaces_by_id() -> None:
    store = ResponseStore()
    response, messages = _response(0), [{"role": "user", "content": "hi"}]
    store.put(response, messages)
    response["pad"], messages[0]["content"] = "changed", "changed"
    stored = store.get("resp_0")
    assert stored is not None and stored.response["pad"] == "x" * 10
    assert stored.messages == [{"role": "user", "content": "hi"}]
    store.put(_response(0, 20), [])
    assert len(store) == 1 and store.bytes == store.get("resp_0").size  # type: ignore[union-attr]


def test_store_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ResponseStore(max_entries=0)


def test_openai_client_parse_sends_a_schema_the_translation_takes() -> None:
    """`client.responses.parse(text_format=Model)` builds `text.format` itself."""

    class City(BaseModel):
        name: str
        population: int

    def handle(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        t = ResponsesTranslation(payload, payload["model"], ResponseStore())
        chat = t.request()
        assert chat["response_format"]["json_schema"]["name"] == "City"
        content = '{"name": "Paris", "population": 2100000}'
        answer = {"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}
        return httpx.Response(200, json=t.answer(answer))

    http = httpx.Client(transport=httpx.MockTransport(handle))
    client = OpenAI(api_key="k", base_url="http://inferd.test/v1", http_client=http)
    parsed = client.responses.parse(model="m", input="A big city?", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2100000)
