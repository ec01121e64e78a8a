"""What the proxy reads from streamed events, and the usage chunk it strips for the client."""

from __future__ import annotations

import asyncio

from inferd.observability.metrics import Metrics
from inferd.server.admission import Admission, Limits
from inferd.server.call import Call

# Events as vLLM 0.32.0 streams them (chat, include_usage).
TOKEN = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"Car"},"logprobs":null,'
    b'"finish_reason":null,"token_ids":null}]}\n\n'
)
LAST = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,'
    b'"finish_reason":"length","stop_reason":null,"token_ids":null}]}\n\n'
)
USAGE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":31,"total_tokens":35,"completion_tokens":4}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _call() -> tuple[Call, Metrics]:
    metrics = Metrics()
    admission = Admission(
        "m", Limits(4, 4, 1.0), metrics.requests_running, metrics.requests_waiting
    )
    slot = asyncio.run(admission.acquire())
    return Call("m", metrics, "/v1/chat/completions", "rid", slot=slot), metrics


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_plain_token_events_pass_untouched() -> None:
    call, _ = _call()
    assert call.observe_events(TOKEN) == TOKEN
    assert call.first_token_at is not None


def test_injected_usage_chunk_is_stripped_and_counted() -> None:
    call, metrics = _call()
    call.strip_usage = True
    out = call.observe_events(TOKEN + LAST + USAGE + DONE)
    assert out == TOKEN + LAST + DONE
    assert (call.prompt_tokens, call.completion_tokens) == (31, 4)
    assert call.finish_reason == "length"
    call.finish(200)
    assert _value(metrics, "prompt_tokens_total", model="m") == 31
    assert _value(metrics, "generation_tokens_total", model="m") == 4
    assert _value(metrics, "request_success_total", model="m", finished_reason="length") == 1
    assert _value(metrics, "num_requests_running", model="m") == 0


def test_usage_the_client_asked_for_is_kept() -> None:
    call, _ = _call()
    assert call.observe_events(USAGE + DONE) == USAGE + DONE
    assert call.completion_tokens == 4


def test_finish_is_recorded_once() -> None:
    call, metrics = _call()
    assert _value(metrics, "num_requests_running", model="m") == 1
    call.finish(502)
    call.finish(499)
    assert _value(metrics, "request_failure_total", model="m", status="502") == 1
    assert _value(metrics, "request_failure_total", model="m", status="499") == 0
    assert _value(metrics, "num_requests_running", model="m") == 0


def test_non_streamed_answer_usage() -> None:
    call, _ = _call()
    call.read_answer(
        b'{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":5}}'
    )
    assert (call.prompt_tokens, call.completion_tokens, call.finish_reason) == (3, 5, "stop")


def test_spaced_json_from_other_engines_is_understood() -> None:
    call, _ = _call()
    call.strip_usage = True
    spaced = (
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}\n\n'
    )
    out = call.observe_events(spaced)
    assert out == spaced.split(b"\n\n")[0] + b"\n\n"
    assert (call.finish_reason, call.completion_tokens) == ("stop", 3)


def test_error_event_inside_a_stream_counts_as_a_failure() -> None:
    call, metrics = _call()
    event = b'data: {"error": {"message": "boom", "type": "server_error", "code": 500}}\n\n'
    assert call.observe_events(TOKEN + event) == TOKEN + event
    call.finish(200)
    assert _value(metrics, "request_failure_total", model="m", status="500") == 1
    assert _value(metrics, "request_success_total", model="m", finished_reason="unknown") == 0


# llama-server's /v1/completions puts usage on the last token event; OpenAI sends it apart.
LLAMA_LAST = (
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"created":1,"model":"m","object":"text_completion",'
    b'"usage":{"completion_tokens":3,"prompt_tokens":1,"total_tokens":4},"id":"cmpl-1"}\n\n'
)


def _events(out: bytes) -> list[dict[str, object]]:
    import json

    return [json.loads(e.removeprefix(b"data: ")) for e in out.split(b"\n\n") if e[6:7] == b"{"]


def test_usage_on_a_token_event_is_split_off_as_openai_sends_it() -> None:
    call, _ = _call()
    events = _events(call.observe_events(LLAMA_LAST + DONE))
    assert [("usage" in e, e["choices"] == []) for e in events] == [(False, False), (True, True)]
    assert events[0]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert events[1]["usage"] == {"completion_tokens": 3, "prompt_tokens": 1, "total_tokens": 4}
    assert events[1]["id"] == "cmpl-1" and events[1]["object"] == "text_completion"
    assert (call.prompt_tokens, call.completion_tokens) == (1, 3)


def test_usage_on_a_token_event_is_dropped_when_the_client_did_not_ask() -> None:
    call, _ = _call()
    call.strip_usage = True
    events = _events(call.observe_events(LLAMA_LAST + DONE))
    assert len(events) == 1 and "usage" not in events[0]
    assert events[0]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert call.completion_tokens == 3  # still counted


def test_an_empty_event_is_dropped() -> None:
    """llama-server (the vendored commit, /v1/completions with a list of prompts) opens a
    stream with `data: null`, which OpenAI's SDK cannot parse."""
    call, _ = _call()
    assert call.observe_events(b"data: null\n\n" + TOKEN) == TOKEN
    assert call.observe_events(TOKEN + b"data: null\n\n" + DONE) == TOKEN + DONE
    assert call.observe_events(b"data: null\n\n") == b""
