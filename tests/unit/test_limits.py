"""Input limits: each breach is a 400 naming the field; unknown parameters are refused."""

from __future__ import annotations

from typing import Any

import pytest

from inferd.errors import InvalidRequestError
from inferd.server import limits

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
