"""Inline PII rails on a real `inferd serve` (llama.cpp), configured by one guardrails file.

To make a real model say exactly what the test needs (personal data, cut into tokens and
streamed event by event), the request carries a llama.cpp grammar that allows one sentence.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.e2e.conftest import INFERD, LLAMACPP_PROFILE, MODEL, Served, serving

# Longer than the 64 characters the output rail holds back, so text flows before the end.
SENTENCE = (
    "Please write to jane.doe@example.com or call +1 415-555-2671 before Friday, and keep "
    "the receipt for your records."
)
REDACTED = SENTENCE.replace("jane.doe@example.com", "[REDACTED:EMAIL]").replace(
    "+1 415-555-2671", "[REDACTED:PHONE]"
)
GRAMMAR = {"grammar": f"root ::= {json.dumps(SENTENCE)}"}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Where do I send the form?"}]


def _serve(tmp: Path, config: str) -> Iterator[Served]:
    path = tmp / "guardrails.yaml"
    path.write_text(config)
    with serving(tmp, "--profile", LLAMACPP_PROFILE, "--guardrails-config", str(path)) as served:
        yield served


@pytest.fixture(scope="module")
def redacting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = "input:\n  pii: {action: redact}\noutput:\n  pii: {action: redact}\n"
    yield from _serve(tmp_path_factory.mktemp("redact"), config)


@pytest.fixture(scope="module")
def blocking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = (
        "input:\n  pii: {action: block, kinds: [email, payment_card]}\n"
        "output:\n  pii: {action: block}\nrefusal: I cannot share contact details.\n"
    )
    yield from _serve(tmp_path_factory.mktemp("block"), config)


def _client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def _forced(client: openai.OpenAI) -> ChatCompletion:
    """The model's answer, held by the grammar to SENTENCE."""
    return client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, extra_body=GRAMMAR
    )


def _forced_stream(client: openai.OpenAI) -> list[ChatCompletionChunk]:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, stream=True, extra_body=GRAMMAR
    )
    return list(stream)


def test_input_redaction_is_what_the_engine_sees(redacting: Served) -> None:
    prompt = "Email jane.doe@example.com about card 4111 1111 1111 1111 now"
    answer = _client(redacting).completions.create(model=MODEL, prompt=prompt, max_tokens=1)

    def count(text: str) -> int:
        r = httpx.post(redacting.url + "/v1/tokenize", json={"model": MODEL, "prompt": text})
        return int(r.json()["count"])

    redacted = "Email [REDACTED:EMAIL] about card [REDACTED:PAYMENT_CARD] now"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == count(redacted) != count(prompt)


def test_output_redaction_whole_and_streamed(redacting: Served) -> None:
    client = _client(redacting)
    whole = _forced(client)
    assert whole.choices[0].message.content == REDACTED
    chunks = _forced_stream(client)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    # Still a stream, not one late block: text arrives while the model is generating.
    assert len([d for d in deltas[:-1] if d]) > 3
    assert "".join(deltas) == REDACTED
    assert not any("jane" in d or "415" in d for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"
    metrics = httpx.get(redacting.url + "/metrics").text
    for stage in ("input", "output"):
        found = re.search(
            rf'^inferd_guardrail_checks_total\{{rail="pii",stage="{stage}"\}} (\d+)', metrics, re.M
        )
        assert found and int(found.group(1)) > 0, stage
    assert re.search(
        r'^inferd_guardrail_redactions_total\{rail="pii",stage="output"\} [1-9]', metrics, re.M
    )


def test_input_block_is_a_400_content_filter(blocking: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(blocking).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "I am jane.doe@example.com"}],
            max_tokens=5,
        )
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "content_filter"
    assert "pii input rail" in error["message"] and "email" in error["message"]
    # Kinds not configured for the input pass: a phone number is not blocked here.
    ok = _client(blocking).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "call +1 415-555-2671"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_output_block_ends_the_stream_and_refuses_the_whole_answer(blocking: Served) -> None:
    client = _client(blocking)
    whole = _forced(client)
    assert whole.choices[0].message.content == "I cannot share contact details."
    assert whole.choices[0].finish_reason == "content_filter"
    chunks = _forced_stream(client)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "jane" not in text and "pii output rail" in text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    # The engine is free again at once: the next request is answered.
    again = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert again.choices


def test_check_endpoint(redacting: Served, blocking: Served) -> None:
    body = {"text": "Mail jane.doe@example.com", "rails": ["pii"]}
    redacted = httpx.post(redacting.url + "/v1/guardrails/check", json=body).json()
    assert redacted["blocked"] is False
    assert redacted["rails"][0]["redacted"] == "Mail [REDACTED:EMAIL]"
    blocked = httpx.post(blocking.url + "/v1/guardrails/check", json=body).json()
    assert blocked["blocked"] is True and blocked["rails"][0]["categories"] == ["email"]
    assert blocked["rails"][0]["ms"] >= 0
    bad = httpx.post(blocking.url + "/v1/guardrails/check", json={**body, "rails": ["nope"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rails"
    # Rails the file does not configure are refused by name, here and at /v1/classify.
    jb = httpx.post(blocking.url + "/v1/guardrails/check", json={**body, "rails": ["jailbreak"]})
    assert jb.status_code == 400 and "jailbreak is not configured" in jb.json()["error"]["message"]
    cl = httpx.post(blocking.url + "/v1/classify", json={"input": "hi"})
    assert cl.status_code == 400 and "jailbreak is not configured" in cl.json()["error"]["message"]


def test_a_malformed_file_stops_start_up_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "guardrails.yaml"
    path.write_text("input:\n  pii:\n    action: erase\n")
    r = subprocess.run(
        [INFERD, "serve", "--guardrails-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:3: input.pii.action" in lines[0], r.stderr


# The same rails on the translated routes (Responses, Messages): they run on the chat request
# and the chat answer inside the translation, whatever API the client speaks. The answer is held
# to SENTENCE by a JSON schema (structured outputs), which both APIs can ask for.
QUESTION = "Where do I send the form?"
FORCED_SCHEMA = {
    "type": "object",
    "properties": {"note": {"type": "string", "const": SENTENCE}},
    "required": ["note"],
    "additionalProperties": False,
}


def test_translated_routes_redact_their_input(redacting: Served) -> None:
    oai = _client(redacting)
    claude = anthropic.Anthropic(base_url=redacting.url, api_key="unused", max_retries=0)
    raw, redacted = "Email jane.doe@example.com now", "Email [REDACTED:EMAIL] now"

    def responses_tokens(text: str) -> int:
        reply = oai.responses.create(model=MODEL, input=text, max_output_tokens=1)
        assert reply.usage is not None
        return reply.usage.input_tokens

    def messages_tokens(text: str) -> int:
        reply = claude.messages.create(
            model=MODEL, max_tokens=1, messages=[{"role": "user", "content": text}]
        )
        return reply.usage.input_tokens

    assert responses_tokens(raw) == responses_tokens(redacted)
    assert messages_tokens(raw) == messages_tokens(redacted)


def test_translated_routes_redact_streamed_answers(redacting: Served) -> None:
    oai = _client(redacting)
    with oai.responses.stream(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=200,
        text={
            "format": {
                "type": "json_schema",
                "name": "note",
                "schema": FORCED_SCHEMA,
                "strict": True,
            }
        },
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response().output_text
    assert json.loads(final)["note"] == REDACTED
    assert len(deltas) > 3 and not any("jane" in d or "415" in d for d in deltas)

    claude = anthropic.Anthropic(base_url=redacting.url, api_key="unused", max_retries=0)
    with claude.messages.stream(
        model=MODEL,
        max_tokens=200,
        messages=[{"role": "user", "content": QUESTION}],
        output_config={"format": {"type": "json_schema", "schema": FORCED_SCHEMA}},
    ) as events:
        texts = list(events.text_stream)
    assert json.loads("".join(texts))["note"] == REDACTED
    assert len(texts) > 3 and not any("jane" in t or "415" in t for t in texts)
