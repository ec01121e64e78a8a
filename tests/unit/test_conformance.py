"""Recorded answers of both engines, made to conform by `server.apis.conform`, against OpenAI's
published API document (tests/conformance.py validates; the recordings are in
tests/fixtures/recorded/conformance/<engine>/, made by record.sh there).

Each recording is checked after reshaping (it must validate) and, where the engine's own answer
does not conform, before (the failure the reshaping fixes is shown, so these tests can fail). The
validator's own reading of the document (nullable fields, ambiguous `oneOf`s) is checked too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from inferd.engines.llamacpp import _LegacyLogprobs
from inferd.server.apis import conform
from tests.conformance import ambiguous_oneofs, assert_valid, matching_branches, validate
from tests.conftest import FIXTURES

RECORDED = FIXTURES / "recorded" / "conformance"
ENGINES = ("llamacpp", "vllm")


def recordings(suffix: str) -> list[tuple[str, str]]:
    """(engine, file name) of each recording of an OpenAI route inferd forwards to the engine
    (not the engines' own `/v1/responses`: inferd serves that route by translation)."""
    return [
        (engine, path.name)
        for engine in ENGINES
        for path in sorted((RECORDED / engine).glob(f"*{suffix}"))
        if not path.name.startswith("responses")
    ]


def route_of(name: str) -> str:
    return conform.CHAT if name.startswith("chat") else conform.COMPLETIONS


def engine_shaped(engine: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """What the front holds before conforming: llama-server's completion logprobs already in
    the legacy shape (its `event_adapter`, which the front applies first)."""
    if engine == "llamacpp" and route_of(name) == conform.COMPLETIONS:
        return _LegacyLogprobs().event(copy.deepcopy(data))
    return data


def sse_data(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a raw SSE stream, in order (`[DONE]`, `event:` lines and comments
    left out)."""
    return [
        json.loads(line[6:])
        for event in raw.split(b"\n\n")
        for line in event.split(b"\n")
        if line.startswith(b"data: {")
    ]


WHOLE: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "chat": ("CreateChatCompletionResponse", conform.chat_answer),
    "completion": ("CreateCompletionResponse", conform.completion_answer),
    "embeddings": ("CreateEmbeddingResponse", conform.embeddings_answer),
}
EVENT = {
    conform.CHAT: "CreateChatCompletionStreamResponse",
    conform.COMPLETIONS: "CreateCompletionStreamResponse",
}


@pytest.mark.parametrize(("engine", "name"), recordings(".json"))
def test_whole_answers_conform(engine: str, name: str) -> None:
    raw = json.loads((RECORDED / engine / name).read_bytes())
    if name == "models.json":
        fixed = conform.models_list(raw)
        assert_valid("ListModelsResponse", fixed)
        for m in fixed["data"]:
            assert_valid("Model", conform.model(m))
        return
    component, fix = WHOLE[name.split("-")[0].removesuffix(".json")]
    original = copy.deepcopy(raw)
    assert_valid(component, fix(engine_shaped(engine, name, raw)))
    assert raw == original, "conform changed its argument"


@pytest.mark.parametrize(("engine", "name"), recordings(".sse"))
def test_stream_events_conform(engine: str, name: str) -> None:
    raw = (RECORDED / engine / name).read_bytes()
    route = route_of(name)
    adapt = (
        _LegacyLogprobs().event if engine == "llamacpp" and route == conform.COMPLETIONS else None
    )
    events = [adapt(e) if adapt else e for e in sse_data(raw)]
    assert events
    fix = conform.chat_chunk if route == conform.CHAT else conform.completion_chunk
    for event in events:
        assert_valid(EVENT[route], fix(event))
    if adapt is None:
        # The bytes path the relay takes gives the same events as the dict path.
        assert sse_data(conform.stream_events(route, raw)) == [fix(e) for e in events]
        assert conform.stream_events(route, raw).endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("engine", "name"), [(e, n) for e, n in recordings(".sse") if "logprobs" not in n]
)
def test_token_events_pass_without_a_parse(engine: str, name: str) -> None:
    """Only an answer's first and last few events may need a JSON parse; token events in
    between pass on byte substitution alone (they are the relay's hot path). Not so with
    logprobs: llama-server's chat logprobs lack `refusal` on every event (and its completion
    logprobs are parsed anyway, by its `event_adapter`)."""
    raw = (RECORDED / engine / name).read_bytes()
    route = route_of(name)
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    parsed = [
        i
        for i, e in enumerate(events)
        if conform.needs_reshaping(conform.drop_null_private(e), route)
    ]
    middle = [i for i in parsed if 1 <= i < len(events) - 3]
    assert not middle, f"token events {middle} of {len(events)} would be parsed"


def test_drop_null_private_is_exact() -> None:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"a\\",\\"token_ids\\":null"},'
    event += b'"logprobs":null,"finish_reason":null,"token_ids":null}],"prompt_text":null}'
    out = conform.drop_null_private(event)
    # The private keys went; the same characters inside the text (escaped quotes) stayed.
    assert json.loads(out[6:]) == {
        "choices": [
            {
                "index": 0,
                "delta": {"content": 'a","token_ids":null'},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
    }


# --- what the engines' own answers get wrong (the tests of the reshaping above can fail) -------

# (engine, recording, errors expected in the engine's own answer or events), found by
# validating every recording; the others conform as the engines send them (extra fields are
# allowed by the document).
REFUSAL = "choices/0/message: 'refusal' is a required property"
LOGPROBS_REFUSAL = "choices/0/logprobs: 'refusal' is a required property"
NULL_DETAILS = [
    "usage/prompt_tokens_details: None is not of type 'object'",
    "usage/completion_tokens_details: None is not of type 'object'",
]
VLLM_MESSAGE = [
    "choices/0/message/annotations: None is not of type 'array'",
    "choices/0/message/function_call: None is not of type 'object'",
]
NONCONFORMING = [
    ("llamacpp", "chat.json", ["choices/0: 'logprobs' is a required property", REFUSAL]),
    ("llamacpp", "chat-logprobs.json", [REFUSAL, "choices/0/logprobs: not valid"]),
    ("llamacpp", "chat-logprobs-stream.sse", [LOGPROBS_REFUSAL]),
    ("vllm", "chat.json", VLLM_MESSAGE + NULL_DETAILS),
    ("vllm", "chat-logprobs.json", [*VLLM_MESSAGE, *NULL_DETAILS, "choices/0/logprobs: not valid"]),
    ("vllm", "chat-logprobs-stream.sse", [LOGPROBS_REFUSAL]),
    ("vllm", "completion.json", NULL_DETAILS),
    ("vllm", "completion-logprobs.json", NULL_DETAILS),
]


def own_errors(engine: str, name: str) -> list[str]:
    """The validator's errors over one recording as the engine sent it (llama-server's
    completion logprobs in the legacy shape, as the front has them before conforming)."""
    raw = (RECORDED / engine / name).read_bytes()
    route = route_of(name)
    if name.endswith(".json"):
        kind = name.split("-")[0].removesuffix(".json")
        return validate(WHOLE[kind][0], engine_shaped(engine, name, json.loads(raw)))
    legacy = _LegacyLogprobs()
    adapt = engine == "llamacpp" and route == conform.COMPLETIONS
    return [
        error
        for event in sse_data(raw)
        for error in validate(EVENT[route], legacy.event(event) if adapt else event)
    ]


@pytest.mark.parametrize(
    ("engine", "name", "expected"), NONCONFORMING, ids=[f"{e}-{n}" for e, n, _ in NONCONFORMING]
)
def test_engine_answers_fail_before_conform(engine: str, name: str, expected: list[str]) -> None:
    errors = "\n".join(own_errors(engine, name))
    for error in expected:
        assert error in errors, f"{error!r} not among:\n{errors}"


@pytest.mark.parametrize(
    ("engine", "name"),
    [
        (e, n)
        for e, n in recordings(".json") + recordings(".sse")
        if (e, n) not in {(e, n) for e, n, _ in NONCONFORMING} and n != "models.json"
    ],
)
def test_the_others_conform_as_sent(engine: str, name: str) -> None:
    """A recording not listed in NONCONFORMING has no error before conforming: the list is
    complete, and an engine that changes its answers shows up here."""
    assert own_errors(engine, name) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_models_conform_as_sent(engine: str) -> None:
    assert (
        validate("ListModelsResponse", json.loads((RECORDED / engine / "models.json").read_bytes()))
        == []
    )


@pytest.mark.parametrize(("engine", "name"), recordings(".json") + recordings(".sse"))
def test_private_fields_are_removed(engine: str, name: str) -> None:
    raw = (RECORDED / engine / name).read_bytes()
    private = conform.LLAMACPP_PRIVATE if engine == "llamacpp" else conform.VLLM_PRIVATE
    if name == "models.json":
        fixed = conform.models_list(json.loads(raw))
        assert private["list"].isdisjoint(fixed)
        assert all(private["model"].isdisjoint(m) for m in fixed["data"])
        return
    if name == "embeddings.json":
        assert private["answer"].isdisjoint(conform.embeddings_answer(json.loads(raw)))
        return
    route = route_of(name)
    if name.endswith(".sse"):
        answers = sse_data(conform.stream_events(route, raw))
    else:
        answers = [conform.answer(route, json.loads(raw))]
    for a in answers:
        assert private["answer"].isdisjoint(a), sorted(private["answer"] & set(a))
        for choice in a["choices"]:
            assert private["choice"].isdisjoint(choice), sorted(private["choice"] & set(choice))


def test_native_responses_do_not_conform() -> None:
    """The engines' own `/v1/responses` (recorded for comparison; inferd translates the route
    over chat completions instead): llama-server's lacks most of what `Response` requires. The
    validator sees it, so it would see the same in inferd's translation."""
    answer = json.loads((RECORDED / "llamacpp" / "responses.json").read_bytes())
    errors = "\n".join(validate("Response", answer))
    assert "'tools' is a required property" in errors
    assert "'logprobs'" not in errors  # llama-server sends output_text's logprobs ([])
    events = sse_data((RECORDED / "llamacpp" / "responses-stream.sse").read_bytes())
    assert validate("ResponseStreamEvent", events[0])  # response.created without a Response
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert deltas and validate("ResponseStreamEvent", deltas[0])  # no sequence_number...
    # vLLM's comes closer, but still not there.
    answer = json.loads((RECORDED / "vllm" / "responses.json").read_bytes())
    errors = "\n".join(validate("Response", answer))
    assert "'error' is a required property" in errors
    assert "output/0/content/0/logprobs: None is not of type 'array'" in errors


def test_llamacpp_answers_carry_timings() -> None:
    """The recordings really hold what the tables say llama-server adds."""
    assert "timings" in json.loads((RECORDED / "llamacpp" / "chat.json").read_bytes())
    assert b'"timings"' in (RECORDED / "llamacpp" / "chat-stream.sse").read_bytes()


# --- the validator's reading of the document ---------------------------------------------------


def chunk(**choice: Any) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, **choice}],
    }


def test_nullable_fields_accept_null_and_nothing_else() -> None:
    # `finish_reason` and `usage` are OpenAPI-3.0 `nullable` (an enum, and a $ref).
    assert validate("CreateChatCompletionStreamResponse", {**chunk(finish_reason=None)}) == []
    assert validate("CreateChatCompletionStreamResponse", {**chunk(finish_reason="stop")}) == []
    with_usage = {**chunk(finish_reason=None), "usage": None}
    assert validate("CreateChatCompletionStreamResponse", with_usage) == []
    assert validate("CreateChatCompletionStreamResponse", chunk(finish_reason="done"))
    assert validate("CreateChatCompletionStreamResponse", {**with_usage, "usage": 3})
    assert validate("CreateChatCompletionStreamResponse", chunk())  # required, even if nullable


def test_completion_events_only_differ_by_a_null_finish_reason() -> None:
    event = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}],
    }
    assert validate("CreateCompletionStreamResponse", event) == []
    assert validate("CreateCompletionResponse", event)


def test_overlapping_oneof_is_read_as_anyof() -> None:
    """`InputItem`'s `EasyInputMessage` and `Item` (`InputMessage`) both take this message:
    as `oneOf` the document would refuse it, though it means to accept it."""
    message = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]}
    assert matching_branches("#/components/schemas/InputItem", message) == [0, 1]
    assert "#/components/schemas/InputItem" in ambiguous_oneofs()
    assert validate("InputItem", message) == []


def test_disjoint_oneof_stays_oneof() -> None:
    # `OutputItem`'s branches have distinct required `type`s: validated as written.
    assert "#/components/schemas/OutputItem" not in ambiguous_oneofs()
    assert validate("OutputItem", {"type": "no-such-item"})


def test_each_event_of_a_chunk_is_judged_on_its_own() -> None:
    """A relay chunk holds several events: one carrying `refusal` does not excuse another's
    logprobs without it."""
    with_refusal = chunk(finish_reason=None, delta={"refusal": "no"})
    logprobs = {"content": [{"token": "a", "logprob": -1.0, "bytes": None, "top_logprobs": []}]}
    without = chunk(finish_reason=None, logprobs=logprobs)
    compact = [json.dumps(e, separators=(",", ":")).encode() for e in (with_refusal, without)]
    raw = b"".join(b"data: " + e + b"\n\n" for e in compact)  # as both engines write JSON
    events = sse_data(conform.stream_events(conform.CHAT, raw))
    assert events[1]["choices"][0]["logprobs"]["refusal"] is None
    for event in events:
        assert_valid("CreateChatCompletionStreamResponse", event)
