"""Input limits, checked before a request costs the engine anything: a clear 400 naming the field.

Checked here: `n`, `max_tokens` / `max_completion_tokens` against the served context, the number
of messages and stop sequences, /v1/completions' prompts (none empty, prompts x n bounded),
`logprobs` / `top_logprobs`, every other numeric field either engine accepts against one table
of bounds (`NUMBERS`: llama.cpp's `n_probs` unbounded makes the engine write megabytes per
token; a penalty window or a kept prefix beyond the context costs work and memory for nothing),
the length of every list or map field (`LISTS`), and parameters the engine would silently
ignore (refused by name instead: an ignored `response_format` or `tools` produces an answer the
client did not ask for). The body size is checked from `Content-Length` before the body is read
(413). A prompt longer than the context is refused by the engine, which knows the token count;
its message (with both counts) comes back in the OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

from inferd.errors import InvalidRequestError

MAX_N = 16  # completions per request: each is a full generation
# Completions in one /v1/completions request in all (prompts x n): each is a full generation, and
# the whole request holds one admission slot.
MAX_CHOICES = 64
MAX_MESSAGES = 2048
MAX_STOP = 16
MAX_LOGPROBS = 20  # OpenAI's own limit for top_logprobs
CONTEXT = -1  # in NUMBERS: the served context, whatever it is
# Every numeric request field either engine reads (llama.cpp's server-schema.cpp, vLLM 0.32's
# protocol models) besides those checked by name below: (lowest, highest, what the bound is).
# A value outside is refused by name; the bounds are wide enough for any sensible use.
NUMBERS: dict[str, tuple[float, float, str]] = {
    # How many tokens' probabilities each generated token carries (llama.cpp), and the prompt's.
    "n_probs": (0, MAX_LOGPROBS, "OpenAI's limit for top_logprobs"),
    "prompt_logprobs": (0, MAX_LOGPROBS, "OpenAI's limit for top_logprobs"),
    "best_of": (1, MAX_N, "each is a full generation"),
    # Token counts and windows: the context bounds them.
    "min_tokens": (0, CONTEXT, "the served context"),
    "n_predict": (-1, CONTEXT, "the served context"),
    "n_keep": (-1, CONTEXT, "the served context"),
    "n_discard": (0, CONTEXT, "the served context"),
    "n_indent": (0, CONTEXT, "the served context"),
    "n_cache_reuse": (0, CONTEXT, "the served context"),
    "repeat_last_n": (-1, CONTEXT, "the served context"),
    "dry_penalty_last_n": (-1, CONTEXT, "the served context"),
    "dry_allowed_length": (0, CONTEXT, "the served context"),
    "truncate_prompt_tokens": (-1, CONTEXT, "the served context"),
    "thinking_token_budget": (0, CONTEXT, "the served context"),
    "stream_interval": (1, CONTEXT, "the served context"),
    "top_k": (-1, 1000, "sampling from more candidates changes nothing but the cost"),
    "min_keep": (0, 1000, "as top_k"),
    # Sampling weights.
    "temperature": (0, 100, "a finite temperature"),
    "top_p": (0, 1, "a probability"),
    "min_p": (0, 1, "a probability"),
    "typical_p": (0, 1, "a probability"),
    "xtc_probability": (0, 1, "a probability"),
    "xtc_threshold": (0, 1, "a probability"),
    "adaptive_target": (0, 1, "a probability"),
    "adaptive_decay": (0, 1, "a rate"),
    "mirostat_eta": (0, 1, "a learning rate"),
    "frequency_penalty": (-2, 2, "OpenAI's range"),
    "presence_penalty": (-2, 2, "OpenAI's range"),
    "repeat_penalty": (0, 10, "a finite penalty"),
    "repetition_penalty": (0, 10, "a finite penalty"),
    "length_penalty": (-10, 10, "a finite penalty"),
    "dry_multiplier": (0, 10, "a finite penalty"),
    "dry_base": (0, 10, "a finite base"),
    "dynatemp_range": (0, 100, "a finite range"),
    "dynatemp_exponent": (0, 100, "a finite exponent"),
    "mirostat": (0, 2, "llama.cpp's versions"),
    "mirostat_tau": (0, 100, "a finite target"),
    "top_n_sigma": (-1, 100, "a finite bound"),
    # Time budgets (ms) and scheduling.
    "t_max_predict_ms": (0, 3_600_000, "an hour"),
    "t_max_prompt_ms": (0, 3_600_000, "an hour"),
    "priority": (-1_000_000, 1_000_000, "a bounded priority"),
    "seed": (-(2**63), 2**64 - 1, "a 64-bit seed"),
}
# List and map fields: the most entries each may have.
LISTS: dict[str, int] = {
    "stop_token_ids": 64,
    "bad_words": 64,
    "allowed_token_ids": 200_000,
    "logit_bias": 1024,
    "samplers": 16,
    "dry_sequence_breakers": 32,
    "grammar_triggers": 64,
    "preserved_tokens": 256,
    "lora": 64,
    "tools": 128,
    "logprob_token_ids": 64,
}


def _int_in(payload: dict[str, Any], name: str, low: int, high: int, why: str = "") -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if not low <= value <= high:
        hint = f" ({why})" if why else ""
        raise InvalidRequestError(f"{name}={value} is outside {low}..{high}{hint}", param=name)


def _number_in(payload: dict[str, Any], name: str, context: int) -> None:
    value = payload.get(name)
    if value is None:
        return
    low, high, why = NUMBERS[name]
    high = context if high == CONTEXT else high
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidRequestError(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name}={value} is outside {low:g}..{high:g} ({why})", param=name
        )


def _bounded(payload: dict[str, Any], context: int) -> None:
    """Every numeric field in NUMBERS and every list or map in LISTS, within its bound."""
    for name in NUMBERS.keys() & payload.keys():
        _number_in(payload, name, context)
    for name in LISTS.keys() & payload.keys():
        value = payload[name]
        if isinstance(value, list | dict) and len(value) > LISTS[name]:
            raise InvalidRequestError(
                f"{name} has {len(value)} entries; at most {LISTS[name]} are accepted",
                param=name,
            )


def _prompts(payload: dict[str, Any]) -> None:
    """/v1/completions' prompt: a string, a list of strings, a list of token ids or a list of
    those, none of them empty, and prompts x n at most `MAX_CHOICES`. vLLM refuses an empty
    prompt with 400; llama-server answers one with nothing, and with `n` above 1 never answers
    at all (found by the adversarial suite), so both engines get the same 400. A prompt of the
    wrong type is left to the engine's own 400."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]  # one prompt as token ids
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        return
    if not prompts:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    for i, one in enumerate(prompts):
        if one == "" or one == []:
            where = "prompt" if len(prompts) == 1 and prompt is not prompts else f"prompt[{i}]"
            raise InvalidRequestError(f"{where} is empty; give at least one token", param="prompt")
    answers = max(_count(payload, "n"), _count(payload, "best_of"))
    if len(prompts) * answers > MAX_CHOICES:
        raise InvalidRequestError(
            f"{len(prompts)} prompts x {answers} answers each is {len(prompts) * answers} "
            f"completions; at most {MAX_CHOICES} per request (send the rest in other requests)",
            param="prompt",
        )


def _count(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _message_shapes(messages: list[Any]) -> None:
    """Each message an object, its content a string, null or a list of typed parts. The engines
    validate the rest, but llama-server answers a part without a `type` with a 500 (seen in the
    adversarial suite), which would reach the client as a 502: the client's error is a 400."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of content parts",
                param="messages",
            )
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequestError(
                    f"messages[{i}].content[{j}] must be an object with a string `type`",
                    param="messages",
                )


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
    _bounded(payload, context)
    if route.endswith("/completions") and not route.endswith("/chat/completions"):
        _prompts(payload)
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
        _message_shapes(messages)
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
