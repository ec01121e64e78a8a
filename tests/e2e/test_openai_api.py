"""The official openai client against a real `inferd serve` with the default model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam
from pydantic import BaseModel

from tests.e2e.conftest import MODEL, Served

pytestmark = pytest.mark.e2e
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello in one short sentence."}
]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and 0 < last.usage.completion_tokens <= 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=8,
            stream=True,
        )
    )
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens <= 8


def test_completions_stream_usage_comes_last_and_only_when_asked(client: openai.OpenAI) -> None:
    def stream(include_usage: bool) -> list[openai.types.Completion]:
        options: ChatCompletionStreamOptionsParam = {"include_usage": include_usage}
        return list(
            client.completions.create(
                model=MODEL,
                prompt="Once upon a time",
                max_tokens=6,
                stream=True,
                stream_options=options,
            )
        )

    asked = stream(include_usage=True)
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens == 6 or asked[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.choices for c in asked[:-1])
    plain = stream(include_usage=False)
    assert plain and all(c.usage is None and c.choices for c in plain)
    assert plain[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_of_several_prompts_at_once(client: openai.OpenAI) -> None:
    """A list of prompts, whole and streamed: a choice per prompt and answer. llama-server opens
    such a stream with a `null` event, which the SDK cannot read; inferd drops it."""
    prompts = ["The sky is", "Two plus two is"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2, 3]
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, stream=True))
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1}
    assert all(isinstance(chunk, openai.types.Completion) for chunk in chunks)


def test_an_empty_prompt_is_refused_on_every_engine(client: openai.OpenAI) -> None:
    """vLLM refuses an empty prompt; llama-server, asked for two answers to one, never answered
    (the adversarial suite's hang): the same 400 from either, at once."""
    for prompt in ("", ["The sky is", ""]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=2, timeout=10)
        assert info.value.body is not None and "empty" in str(info.value.body)


def test_n_returns_several_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]


def test_stop_sequence_ends_the_answer(client: openai.OpenAI) -> None:
    prompt = "List the days of the week: Monday, Tuesday,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    words = free.choices[0].text.split()
    assert len(words) >= 3, free.choices[0].text
    stop = words[2]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert free.choices[0].text.startswith(cut.choices[0].text)


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        r = client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_logprobs(client: openai.OpenAI) -> None:
    # Greedy: llama-server gives the tokens that spell one UTF-8 character (an emoji is several)
    # one logprobs entry between them, and none to a character the answer ends inside of; a
    # sampled answer sometimes holds one (README: "logprobs on llama.cpp"), the greedy one
    # to HELLO does not, so each of its tokens has its entry on every engine.
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2)
    assert c.choices[0].logprobs is not None
    assert len(c.choices[0].logprobs.tokens or []) == 4


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_follows_the_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
        max_tokens=64,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True},
        },
    )
    content = r.choices[0].message.content
    assert content is not None
    person = Person.model_validate(json.loads(content))
    assert isinstance(person.age, int)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert info.value.code == "model_not_found"


def test_invalid_field_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**6)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "max_tokens"


def test_tokenize_and_detokenize(server: Served) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        tokens = c.post("/v1/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        text = c.post("/v1/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
        assert text["prompt"] == "hello world"


def test_malformed_json_is_400(server: Served) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
