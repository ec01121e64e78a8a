"""Input limits, checked before a request costs the engine anything: a clear 400 naming the field.

Checked here: `n`, `max_tokens` / `max_completion_tokens` against the served context, the number
of messages and stop sequences, `logprobs` / `top_logprobs`, and parameters the engine would
silently ignore (refused by name instead: an ignored `response_format` or `tools` produces an
answer the client did not ask for). The body size is checked from `Content-Length` before the
body is read (413). A prompt longer than the context is refused by the engine, which knows the
token count; its message (with both counts) comes back in the OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

from inferd.errors import InvalidRequestError

MAX_N = 16  # completions per request: each is a full generation
MAX_MESSAGES = 2048
MAX_STOP = 16
MAX_LOGPROBS = 20  # OpenAI's own limit for top_logprobs


def _int_in(payload: dict[str, Any], name: str, low: int, high: int, why: str = "") -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if not low <= value <= high:
        hint = f" ({why})" if why else ""
        raise InvalidRequestError(f"{name}={value} is outside {low}..{high}{hint}", param=name)


def check(
    route: str,
    payload: dict[str, Any],
    *,
    context: int,
    accepted: frozenset[str] | None,
    engine: str,
    max_n: int = MAX_N,
) -> None:
    """Raise `InvalidRequestError` for the first limit the request breaks."""
    if accepted is not None:
        unknown = sorted(set(payload) - accepted)
        if unknown:
            raise InvalidRequestError(
                f"unsupported parameter {unknown[0]!r}: the {engine} engine would ignore it, "
                "so it is refused rather than silently dropped",
                param=unknown[0],
            )
    _int_in(payload, "n", 1, max_n, f"the {engine} engine answers at most {max_n} per request")
    for name in ("max_tokens", "max_completion_tokens"):
        _int_in(payload, name, 1, context, f"the served context is {context} tokens")
    messages = payload.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequestError(
                f"{len(messages)} messages; at most {MAX_MESSAGES} are accepted", param="messages"
            )
    stop = payload.get("stop")
    if isinstance(stop, list):
        if len(stop) > MAX_STOP:
            raise InvalidRequestError(
                f"{len(stop)} stop sequences; at most {MAX_STOP}", param="stop"
            )
        if not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("stop sequences must be strings", param="stop")
    elif stop is not None and not isinstance(stop, str):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    _int_in(payload, "top_logprobs", 0, MAX_LOGPROBS)
    logprobs = payload.get("logprobs")
    if route.endswith("/chat/completions"):
        if logprobs is not None and not isinstance(logprobs, bool):
            raise InvalidRequestError("logprobs must be true or false", param="logprobs")
    else:
        _int_in(payload, "logprobs", 0, MAX_LOGPROBS)
