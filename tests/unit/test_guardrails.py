"""PII detection and redaction, the guardrails file, and rails over requests and streams."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from inferd.errors import ConfigError, ContentFilterError, InvalidRequestError
from inferd.guardrails import config, pii
from inferd.guardrails.config import GuardrailsConfig, InputRails, OutputRails, PiiRail
from inferd.guardrails.rails import MAX_PII_CHARS, NO_TEXT, Guardrails
from inferd.guardrails.stream import HOLD, MAX_HELD
from inferd.guardrails.texts import guardrail_texts
from inferd.observability.metrics import Metrics

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("email", "jane.doe+news@example.co.uk"),
        ("phone", "+1 415-555-2671"),
        ("phone", "+44 20 7946 0958"),
        ("payment_card", "4111 1111 1111 1111"),
        ("payment_card", "5500-0000-0000-0004"),
        ("iban", "GB82 WEST 1234 5698 7654 32"),
        ("iban", "DE89370400440532013000"),
        ("ip_address", "192.168.1.20"),
        ("ip_address", "2001:db8::1"),
        ("us_ssn", "123-45-6789"),
        ("ip_address", "fe80::1"),
        ("ip_address", "::ffff:10.0.0.1"),
    ],
)
def test_each_kind_is_found_and_redacted(kind: str, text: str) -> None:
    sentence = f"Here it is: {text}. Thanks"
    found = pii.find(sentence)
    assert [(f.kind, sentence[f.start : f.end]) for f in found] == [(kind, text)]
    assert pii.redact(sentence, found) == f"Here it is: [REDACTED:{kind.upper()}]. Thanks"


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails Luhn
        "IBAN GB82 WEST 1234 5698 7654 33",  # fails mod 97
        "IBAN GB82 WEST 1234 5698 7654",  # wrong length for GB
        "ssn 000-12-3456",  # area 000 is never issued
        "ssn 666-12-3456",
        "version 1.2.3.4.5 and 999.1.1.1",
        "order 1234567890123",
        "call 555-0100",  # not a dialable number anywhere
        "no personal data here at all",
    ],
)
def test_lookalikes_are_left_alone(text: str) -> None:
    assert pii.find(text) == []


@pytest.mark.parametrize(
    ("text", "kind", "span"),
    [
        ("card 4111 1111 1111 1111 123 (CVV)", "payment_card", "4111 1111 1111 1111"),
        ("4111-1111-1111-1111 12/26", "payment_card", "4111-1111-1111-1111"),
        ("card 4111.1111.1111.1111", "payment_card", "4111.1111.1111.1111"),
        ("IBAN ES91 2100 0418 4502 0005 1332 BIC CAIX", "iban", "ES91 2100 0418 4502 0005 1332"),
        ("BE68 5390 0754 7034 EUR", "iban", "BE68 5390 0754 7034"),
        ("host 192.168.1.20:8080", "ip_address", "192.168.1.20"),
    ],
)
def test_what_follows_a_number_does_not_hide_it(text: str, kind: str, span: str) -> None:
    assert [(f.kind, text[f.start : f.end]) for f in pii.find(text)] == [(kind, span)]


def test_a_phone_number_after_long_padding_is_still_found() -> None:
    # libphonenumber gives up after 65,535 candidates unless told otherwise.
    text = "item 12, " * 70_000 + "call +1 415-555-2671"
    assert [f.kind for f in pii.find(text, kinds=["phone"])] == ["phone"]


def test_kinds_limit_what_is_looked_for() -> None:
    text = "jane@example.com, 4111 1111 1111 1111"
    assert [f.kind for f in pii.find(text, kinds=["payment_card"])] == ["payment_card"]


def test_checksums() -> None:
    assert pii.luhn_ok("79927398713") and not pii.luhn_ok("79927398710")
    assert pii.iban_ok("NL91ABNA0417164300") and not pii.iban_ok("NL91ABNA0417164301")


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guardrails.yaml"
    path.write_text(text)
    return path


def test_config_file_loads(tmp_path: Path) -> None:
    loaded = config.load(
        _file(tmp_path, "input:\n  pii:\n    action: block\n    kinds: [email]\nrefusal: null\n")
    )
    assert loaded.input.pii == PiiRail(action="block", kinds=("email",))
    assert loaded.output.pii is None and loaded.refusal is None and loaded.active
    assert not config.load(_file(tmp_path, "")).active


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("input:\n  pii:\n    action: erase\n", ":3: input.pii.action"),
        ("input:\n  pii:\n    kinds: [email, passport]\n", ":3: input.pii.kinds.1"),
        ("output:\n  piii: {}\n", ":2: output.piii: Extra inputs"),
        ("input: [\n", ":2: "),
        ("- pii\n", ":1: expected a mapping"),
        ("input:\n  pii:\n    kinds: []\n", ":3: input.pii.kinds"),
        ("input:\n  pii:\n    roles: [boss]\n", ":3: input.pii.roles.0"),
    ],
)
def test_a_bad_file_is_refused_with_its_line(tmp_path: Path, text: str, where: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.message.startswith(f"guardrails config {path}")
    assert where in info.value.message, info.value.message


def _guards(stage: str, action: str, refusal: str | None = "No.") -> Guardrails:
    rail = PiiRail(action=action)  # type: ignore[arg-type]
    if stage == "input":
        cfg = GuardrailsConfig(input=InputRails(pii=rail), refusal=refusal)
    else:
        cfg = GuardrailsConfig(output=OutputRails(pii=rail), refusal=refusal)
    return Guardrails(cfg, Metrics())


async def test_input_rail_redacts_user_messages_only_and_blocks_by_name() -> None:
    payload: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "Support desk: help@corp.example.com"},
            {"role": "user", "content": "I am jane@example.com"},
            {"role": "user", "content": [{"type": "text", "text": "card 4111 1111 1111 1111"}]},
        ]
    }
    assert await _guards("input", "redact").guard_request(CHAT, payload, False)
    assert payload["messages"][0]["content"] == "Support desk: help@corp.example.com"
    assert payload["messages"][1]["content"] == "I am [REDACTED:EMAIL]"
    assert payload["messages"][2]["content"][0]["text"] == "card [REDACTED:PAYMENT_CARD]"
    prompt = {"prompt": ["a", "mail jane@example.com"]}
    assert await _guards("input", "redact").guard_request("/v1/completions", prompt, False)
    assert prompt["prompt"] == ["a", "mail [REDACTED:EMAIL]"]
    with pytest.raises(ContentFilterError, match="pii input rail: the request contains email"):
        await _guards("input", "block").guard_request(
            CHAT, {"messages": [{"role": "user", "content": "I am jane@example.com"}]}, False
        )
    # A route that declares it has no text to guard (embeddings) passes; one that declares
    # something the rails do not know is refused, so it can never reach an engine unguarded.
    assert not await _guards("input", "block").guard_request(NO_TEXT, {"input": "a@b.io"}, False)
    with pytest.raises(ValueError, match="do not know where route"):
        await _guards("input", "block").guard_request("/v1/embeddings", {"input": "a"}, False)


async def test_output_rail_on_whole_answers() -> None:
    def answer() -> dict[str, Any]:
        message = {"role": "assistant", "content": "Mail jane@example.com"}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    redacted = await _guards("output", "redact").guard_answer(CHAT, {}, answer())
    assert redacted["choices"][0]["message"]["content"] == "Mail [REDACTED:EMAIL]"
    refused = await _guards("output", "block").guard_answer(CHAT, {}, answer())
    assert refused["choices"][0]["message"]["content"] == "No."
    assert refused["choices"][0]["finish_reason"] == "content_filter"
    with pytest.raises(ContentFilterError):
        await _guards("output", "block", refusal=None).guard_answer(CHAT, {}, answer())


def _events(pieces: list[str], chat: bool = True) -> list[bytes]:
    events = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if last else None}
        if chat:
            choice["delta"] = {"content": piece}
        else:
            choice["text"] = piece
        events.append(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
    return [*events, b"data: [DONE]\n\n"]


def _client_text(out: bytes, chat: bool = True) -> str:
    text = ""
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:])["choices"]:
                text += choice["delta"].get("content", "") if chat else choice.get("text", "")
    return text


@pytest.mark.parametrize("chat", [True, False])
async def test_streamed_pii_split_across_events_never_reaches_the_client(chat: bool) -> None:
    answer = (
        "Sure. " + "x" * 80 + " write to jane.doe@example.com or 4111 1111 1111 1111. " + "y" * 80
    )
    # Token-sized pieces: the address and the card are cut across many events.
    pieces = [answer[i : i + 3] for i in range(0, len(answer), 3)]
    flt = _guards("output", "redact").stream_filter(CHAT if chat else "/v1/completions", {})
    assert flt is not None
    out, sent = b"", []
    for event in _events(pieces, chat):
        chunk, stop = await flt.process(event)
        assert not stop
        out += chunk
        sent.append(_client_text(out, chat))
    text = _client_text(out, chat)
    assert text == answer.replace("jane.doe@example.com", "[REDACTED:EMAIL]").replace(
        "4111 1111 1111 1111", "[REDACTED:PAYMENT_CARD]"
    )
    assert all("jane" not in s and "4111" not in s for s in sent)
    # Text flows with at most HOLD characters held back.
    assert len(sent[len(pieces) // 2]) >= len(answer[: 3 * (len(pieces) // 2)]) - HOLD - 40
    assert out.endswith(b"data: [DONE]\n\n")


async def test_a_blocked_stream_ends_with_content_filter() -> None:
    flt = _guards("output", "block").stream_filter(CHAT, {})
    assert flt is not None
    out, stopped = b"", False
    for event in _events(["Hello, ", "my mail is jane@", "example.com ok", "!"]):
        chunk, stopped = await flt.process(event)
        out += chunk
        if stopped:
            break
    assert stopped and out.endswith(b"data: [DONE]\n\n")
    last = json.loads(out.split(b"\n\n")[-3][6:])["choices"][0]
    assert (
        last["finish_reason"] == "content_filter" and "pii output rail" in last["delta"]["content"]
    )
    assert "jane" not in _client_text(out)


async def test_check_endpoint_rails() -> None:
    guards = Guardrails(GuardrailsConfig(), Metrics())
    [verdict] = await guards.check(guardrail_texts({"text": "call +1 415-555-2671"}), ["pii"])
    assert verdict.blocked and verdict.categories == ["phone"] and verdict.ms >= 0
    x = guardrail_texts({"text": "x"})
    with pytest.raises(InvalidRequestError, match="rail jailbreak is not configured"):
        await guards.check(x, ["pii", "jailbreak"])
    with pytest.raises(InvalidRequestError, match="rails must name"):
        await guards.check(x, ["spam"])
    with pytest.raises(InvalidRequestError, match="each once"):
        await guards.check(x, ["pii", "pii"])


async def test_roles_choose_whose_messages_the_input_rail_reads() -> None:
    rails = InputRails(pii=PiiRail(action="block", roles=("user", "system")))
    guards = Guardrails(GuardrailsConfig(input=rails), Metrics())
    payload = {"messages": [{"role": "system", "content": "SSN 123-45-6789"}]}
    with pytest.raises(ContentFilterError):
        await guards.guard_request(CHAT, payload, False)


@pytest.mark.parametrize(
    "extra",
    [
        {"logprobs": True},
        {"top_logprobs": 2},
        {"tools": [{"type": "function"}]},
        {"logprobs": 0},
        # llama.cpp returns every generated token in `n_probs`' probabilities, vLLM the ids a
        # client can detokenize: both carry the answer past the rails.
        {"n_probs": 1},
        {"return_token_ids": True},
        {"return_tokens": True},
        {"post_sampling_probs": True},
    ],
)
async def test_fields_the_output_rail_cannot_read_are_refused(extra: dict[str, Any]) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(InvalidRequestError, match="while output rails are on") as info:
        await _guards("output", "redact").guard_request(CHAT, payload, False)
    assert info.value.param == next(iter(extra))
    await _guards("input", "redact").guard_request(CHAT, payload, False)  # input rails alone: fine


async def test_whole_answers_reasoning_is_redacted_and_a_refusal_keeps_nothing() -> None:
    def answer() -> dict[str, Any]:
        message = {"role": "assistant", "content": "ok", "reasoning_content": "jane@example.com"}
        return {"choices": [{"index": 0, "message": message, "logprobs": {"content": []}}]}

    redacted = await _guards("output", "redact").guard_answer(CHAT, {}, answer())
    assert redacted["choices"][0]["message"]["reasoning_content"] == "[REDACTED:EMAIL]"
    refused = await _guards("output", "block").guard_answer(CHAT, {}, answer())
    assert refused["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "No."},
        "finish_reason": "content_filter",
    }


def _event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return b"data: " + json.dumps({"id": "x", "choices": choices, **extra}).encode() + b"\n\n"


async def test_streams_with_several_choices_reasoning_usage_and_no_finish_reason() -> None:
    flt = _guards("output", "redact").stream_filter(CHAT, {})
    assert flt is not None
    events = [
        _event([{"index": 0, "delta": {"reasoning_content": "think jane@exa"}}]),
        _event([{"index": 1, "delta": {"content": "call 4111 1111 "}}]),
        _event([{"index": 0, "delta": {"reasoning_content": "mple.com done"}}]),
        _event([{"index": 1, "delta": {"content": "1111 1111"}}]),
        _event([], usage={"prompt_tokens": 1, "completion_tokens": 4}),
        b"data: [DONE]\n\n",  # no finish_reason came: what is held is flushed, redacted
    ]
    out = b"".join([(await flt.process(e))[0] for e in events])
    seen: dict[tuple[int, str], str] = {}
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for c in json.loads(event[6:])["choices"]:
                for key, value in c.get("delta", {}).items():
                    seen[(c["index"], key)] = seen.get((c["index"], key), "") + value
    assert seen == {
        (0, "reasoning_content"): "think [REDACTED:EMAIL] done",
        (1, "content"): "call [REDACTED:PAYMENT_CARD]",
    }
    assert b'"usage"' in out and out.endswith(b"data: [DONE]\n\n")


def test_check_texts_refuse_bad_parts_and_skip_tool_turns() -> None:
    messages = [
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "hi"}]},
    ]
    assert guardrail_texts({"messages": messages}).all == ["hi"]
    bad = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    with pytest.raises(InvalidRequestError, match="must be a string"):
        guardrail_texts({"messages": bad})
    with pytest.raises(InvalidRequestError, match="either text"):
        guardrail_texts({"text": "a", "messages": messages})


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], ["text", [4, 5]]])
async def test_token_prompts_are_refused_while_input_rails_are_on(prompt: list[Any]) -> None:
    payload = {"prompt": prompt}
    with pytest.raises(InvalidRequestError, match="token ids") as info:
        await _guards("input", "redact").guard_request("/v1/completions", payload, False)
    assert info.value.param == "prompt"
    await _guards("output", "redact").guard_request("/v1/completions", payload, False)


async def test_a_span_that_keeps_growing_is_not_held_without_bound() -> None:
    # An e-mail address whose domain never ends: one finding from "jane" to the end of the text.
    answer = "write to jane@" + ".".join(["ab"] * 3000) + ".com and done"
    pieces = [answer[i : i + 3] for i in range(0, len(answer), 3)]
    flt = _guards("output", "redact").stream_filter(CHAT, {})
    assert flt is not None
    out, held = b"", []
    for event in _events(pieces, True):
        chunk, _ = await flt.process(event)
        out += chunk
        held.append(max((len(t) for t in flt.pending.values()), default=0))
    assert max(held) <= MAX_HELD + HOLD
    text = _client_text(out)
    assert "jane" not in text and text.startswith("write to [REDACTED:EMAIL]")


async def test_the_pii_rail_runs_off_the_event_loop_within_a_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Digit-dense text costs the phone matcher about 15 ms per KiB: never on the event loop.
    guards = _guards("input", "redact")
    threads: list[str] = []
    find = pii.find

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return find(*args)

    monkeypatch.setattr(pii, "find", recording)
    digits = " ".join("4155552671" for _ in range(2000))
    verdicts = await guards.check(guardrail_texts({"text": digits}), ["pii"])
    assert verdicts[0].redacted is not None
    payload = {"messages": [{"role": "user", "content": digits}]}
    await guards.guard_request(CHAT, payload, True)
    assert threads and all(t.startswith("inferd-pii") for t in threads)
    # A budget per request: past it, a clear refusal instead of seconds of matching.
    huge = {"messages": [{"role": "user", "content": "1" * (MAX_PII_CHARS + 1)}]}
    with pytest.raises(InvalidRequestError, match="pii rail reads at most"):
        await guards.guard_request(CHAT, huge, True)
    with pytest.raises(InvalidRequestError, match="pii rail reads at most"):
        await guards.check(guardrail_texts({"text": "1" * (MAX_PII_CHARS + 1)}), ["pii"])
