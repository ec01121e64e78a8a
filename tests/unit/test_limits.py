"""Input limits: each breach is a 400 naming the field; unknown parameters are refused."""

from __future__ import annotations

from typing import Any

import pytest

from inferd.errors import InvalidRequestError
from inferd.server import limits
from inferd.server.proxy import parse_body

CHAT = "/v1/chat/completions"
OK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ACCEPTED = frozenset(
    {
        "model",
        "messages",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "logprobs",
        "top_logprobs",
        "prompt",
        "stream",
    }
)


def _check(payload: dict[str, Any], route: str = CHAT) -> None:
    limits.check(route, payload, context=8192, accepted=ACCEPTED, engine="vllm")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": "2"}, "n"),
        ({"max_tokens": 8193}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 5}, "logprobs"),
        ({"frobnicate": True}, "frobnicate"),
    ],
)
def test_each_breach_names_its_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _check({**OK, **extra})
    assert info.value.param == param


def test_within_limits_passes() -> None:
    _check(
        {
            **OK,
            "n": 2,
            "max_tokens": 8192,
            "stop": ["\n", "."],
            "logprobs": True,
            "top_logprobs": 20,
        }
    )
    limits.check(
        "/v1/completions",
        {"model": "m", "prompt": "x", "logprobs": 5},
        context=8192,
        accepted=ACCEPTED,
        engine="vllm",
    )


def test_completions_logprobs_is_a_count() -> None:
    with pytest.raises(InvalidRequestError):
        limits.check(
            "/v1/completions",
            {"model": "m", "prompt": "x", "logprobs": 21},
            context=8192,
            accepted=ACCEPTED,
            engine="vllm",
        )


def test_unknown_parameter_message_says_why() -> None:
    with pytest.raises(InvalidRequestError, match="would ignore it"):
        _check({**OK, "frobnicate": 1})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # llama.cpp's n_probs at the vocabulary size: megabytes of probabilities per token.
        ("n_probs", 49152),
        ("prompt_logprobs", 1000),
        ("repeat_last_n", 10**9),
        ("n_keep", 10**6),
        ("top_k", 10**6),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("min_tokens", 5000),
        ("logit_bias", {str(i): 1 for i in range(5000)}),
        ("samplers", ["top_k"] * 100),
    ],
)
def test_every_numeric_or_list_field_has_a_bound(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        limits.check(CHAT, {**OK, field: value}, context=4096, accepted=None, engine="e")
    assert info.value.param == field


def test_values_within_the_bounds_pass() -> None:
    fine = {"n_probs": 5, "repeat_last_n": 64, "top_k": 40, "temperature": 0.7, "seed": 2**40}
    limits.check(CHAT, {**OK, **fine}, context=4096, accepted=None, engine="e")


@pytest.mark.parametrize(
    "messages",
    [
        ["hi"],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": [{"text": "no type"}]}],
        [{"role": "user", "content": ["a bare string part"]}],
    ],
)
def test_malformed_messages_are_the_clients_error(messages: list[Any]) -> None:
    # llama-server answered these with a 500 (a 502 from the front): the front refuses them.
    with pytest.raises(InvalidRequestError) as err:
        _check({**OK, "messages": messages})
    assert err.value.param == "messages"


def test_typed_content_parts_pass() -> None:
    _check({**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})


@pytest.mark.parametrize("given", [{}, {"max_tokens": None}])
def test_a_completion_without_max_tokens_gets_openais_default(given: dict[str, Any]) -> None:
    from inferd.server.proxy import COMPLETION_MAX_TOKENS, _default_max_tokens

    payload: dict[str, Any] = {"model": "m", "prompt": "hi", **given}
    assert _default_max_tokens("/v1/completions", payload)
    assert payload["max_tokens"] == COMPLETION_MAX_TOKENS == 16
    chat: dict[str, Any] = {**OK}
    assert not _default_max_tokens(CHAT, chat) and "max_tokens" not in chat
    set_by_client: dict[str, Any] = {"model": "m", "prompt": "hi", "max_tokens": 100}
    assert not _default_max_tokens("/v1/completions", set_by_client)
    assert set_by_client["max_tokens"] == 100


@pytest.mark.parametrize(
    ("prompt", "n", "says"),
    [
        ("", 1, "prompt is empty"),
        ([], 1, "must not be an empty list"),
        (["a", ""], 2, r"prompt\[1\] is empty"),
        ([[1, 2], []], 1, r"prompt\[1\] is empty"),
        (["a"] * 33, 2, "66 completions; at most 64"),
        (["a"] * 65, 1, "65 completions"),
    ],
)
def test_completions_prompts_are_not_empty_and_bounded(prompt: Any, n: int, says: str) -> None:
    """An empty prompt: vLLM refuses it, llama-server hangs on it with n > 1 (adversarial
    suite); so both engines get the same 400."""
    payload = {"model": "m", "prompt": prompt, "n": n}
    with pytest.raises(InvalidRequestError, match=says) as info:
        _check(payload, "/v1/completions")
    assert info.value.param == "prompt"


@pytest.mark.parametrize("prompt", ["x", ["a", "b"], [1, 2, 3], [[1], [2, 3]], ["a"] * 64, None, 7])
def test_completions_prompts_that_pass(prompt: Any) -> None:
    _check({"model": "m", "prompt": prompt}, "/v1/completions")
    _check({"model": "m", "messages": [{"role": "user", "content": ""}]})  # chat: not a prompt


def test_a_lone_surrogate_is_refused_and_a_pair_is_a_character() -> None:
    """JSON's grammar allows `\\ud886` alone; no engine takes it (llama-server fails on it) and
    no answer could name it in UTF-8: one 400 on every engine, keys included. A pair is the
    character it encodes."""
    paired = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}'
    assert parse_body(paired)["messages"][0]["content"] == "hi \U0001f600"
    for body in (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud886"}]}',
        b'{"model": "m", "y\\ud886": {"a": 1}}',
        b'{"model": "m", "stop": ["\\udfcb"]}',
    ):
        with pytest.raises(InvalidRequestError, match="unpaired UTF-16 surrogate"):
            parse_body(body)
