"""Engine answers made to conform to OpenAI's published API document (openai/openai-openapi).

Both engines speak "OpenAI-compatible", but neither answers exactly what OpenAI's document
describes, and not in the same way: llama-server leaves out fields the document requires
(`choices[].logprobs` and `message.refusal` of a whole chat answer, both nullable) and adds its
own (`timings`, `__verbose`...); vLLM sends `null` for optional fields the document does not let
be null (`message.annotations`, `usage.prompt_tokens_details`...) and adds its own (`token_ids`,
`kv_transfer_params`...). The functions here give every answer OpenAI's shape, so a client sees
the same fields whichever engine serves the model: required nullable fields are added as `null`,
`null`s the document does not allow are dropped, and the engines' private fields (the tables
below, one per engine) are removed. Anything else (content, OpenAI's optional fields, extensions
clients read such as `reasoning_content`) passes unchanged.

Whole answers are parsed anyway, so `chat_answer`, `completion_answer`, `models_list` and
`model` take and return dicts. Stream events are on the hot path: `stream_events` works on the
raw SSE bytes, drops the engines' `"key":null` private fields by byte substitution (a key with an
unescaped quote can only be a key, never text inside a JSON string) and parses an event only if a
marker of something else to reshape is in it. Token events of both engines then pass without a
JSON parse (in about a quarter of a parse's time), except when the client asked for logprobs:
neither engine's chat logprobs carry the required `refusal`. The functions never change their
argument: a reshaped level is a new dict, untouched values are shared.

tests/conformance.py validates the results against the document; tests/unit/test_conformance.py
runs it over recorded answers of both engines.
"""

from __future__ import annotations

import json
import re
from typing import Any

# --- llama.cpp's llama-server (vendored llama.cpp, tools/server/server-task.cpp) --------------
LLAMACPP_PRIVATE: dict[str, frozenset[str]] = {
    # Top level of chat and completion answers and events.
    "answer": frozenset(
        {
            "timings",  # stats.to_json(): every whole answer, the last event of a stream
            "__verbose",  # to_json_non_oaicompat(), when the server runs with --verbose
            "prompt_progress",  # progress.to_json(), when a request sets return_progress
            "completion_probabilities",  # non-OAI probs, when n_probs is set
        }
    ),
    # Each element of `choices`: llama-server adds none today.
    "choice": frozenset(),
    # Each token of a chat answer's `logprobs.content` (and of its `top_logprobs`): the token's
    # id in the model's vocabulary (completion_token_output::probs_vector_to_json).
    "logprob": frozenset({"id"}),
    # `/v1/models`: the list's Ollama-style copy (`models`), and per model its GGUF
    # metadata (server-context.cpp get_res_model_info; server-models.cpp in router mode).
    "list": frozenset({"models"}),
    "model": frozenset(
        {"aliases", "tags", "meta", "status", "architecture", "source", "can_remove"}
    ),
}

# --- vLLM (vllm/entrypoints/openai/protocol.py, 0.32.0) ---------------------------------------
VLLM_PRIVATE: dict[str, frozenset[str]] = {
    # Top level: prompt echo and disaggregated-serving fields, null unless asked for.
    "answer": frozenset(
        {
            "prompt_logprobs",
            "prompt_token_ids",
            "prompt_text",
            "kv_transfer_params",
            "ec_transfer_params",
            "metrics",
        }
    ),
    # Each element of `choices`: the stop token/string that ended it (`stop_reason`, next to
    # OpenAI's `finish_reason`), generated token ids (return_token_ids), MoE routing, and on
    # /v1/completions the prompt echo again, per choice.
    "choice": frozenset(
        {"stop_reason", "token_ids", "routed_experts", "prompt_logprobs", "prompt_token_ids"}
    ),
    "logprob": frozenset(),
    "list": frozenset(),
    # Model objects keep vLLM's extras (`root`, `parent`, `max_model_len`, `permission`): NIM,
    # which runs vLLM, answers them too and its clients read `max_model_len`.
    "model": frozenset(),
}

_ANSWER = LLAMACPP_PRIVATE["answer"] | VLLM_PRIVATE["answer"]
_CHOICE = LLAMACPP_PRIVATE["choice"] | VLLM_PRIVATE["choice"]
_LOGPROB = LLAMACPP_PRIVATE["logprob"] | VLLM_PRIVATE["logprob"]
_LIST = LLAMACPP_PRIVATE["list"] | VLLM_PRIVATE["list"]
_MODEL = LLAMACPP_PRIVATE["model"] | VLLM_PRIVATE["model"]

# Optional fields that the document does not let be null, which vLLM sends as null: dropped when
# null (OpenAI leaves them out). Nullable ones (`audio`, `content`, `refusal`) stay.
_NOT_NULL_MESSAGE = frozenset({"annotations", "function_call", "tool_calls"})
# vLLM's reasoning text (`reasoning`, `reasoning_content`): an extension clients read; kept when
# set, dropped when null so an answer without reasoning looks like OpenAI's.
_EXTENSIONS_IF_SET = frozenset({"reasoning", "reasoning_content"})
_NOT_NULL_USAGE = frozenset({"prompt_tokens_details", "completion_tokens_details"})
# `usage` may be null in a stream chunk, not in a whole answer; left out, it is right in both.
_NOT_NULL_TOP = frozenset({"system_fingerprint", "usage"})
_NOT_NULL_DELTA = frozenset({"function_call", "tool_calls"})

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def strip_private(obj: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """`obj` without `fields` (a new dict only when one of them is there)."""
    if fields.isdisjoint(obj):
        return obj
    return {k: v for k, v in obj.items() if k not in fields}


def _drop_nulls(obj: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    if not any(obj.get(f, 0) is None for f in fields):
        return obj
    return {k: v for k, v in obj.items() if not (v is None and k in fields)}


def _top(answer: dict[str, Any]) -> dict[str, Any]:
    out = _drop_nulls(strip_private(answer, _ANSWER), _NOT_NULL_TOP)
    usage = out.get("usage")
    if isinstance(usage, dict):
        fixed = _drop_nulls(usage, _NOT_NULL_USAGE)
        if fixed is not usage:
            out = {**out, "usage": fixed}
    return out


def _choices(answer: dict[str, Any], one: Any) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return answer
    fixed = [one(c) if isinstance(c, dict) else c for c in choices]
    if all(a is b for a, b in zip(fixed, choices, strict=True)):
        return answer
    return {**answer, "choices": fixed}


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out = strip_private(choice, _CHOICE)
    message = out.get("message")
    if isinstance(message, dict):
        msg = _drop_nulls(_drop_nulls(message, _NOT_NULL_MESSAGE), _EXTENSIONS_IF_SET)
        # Required (nullable) by the document; llama-server leaves them out when they are empty.
        if "content" not in msg or "refusal" not in msg:
            msg = {"content": None, "refusal": None, **msg}
        if msg is not message:
            out = {**out, "message": msg}
    if "logprobs" not in out:
        out = {**out, "logprobs": None}  # required (nullable); llama-server omits it
    return _chat_logprobs(out)


def _chat_logprobs(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice's `logprobs` with `refusal` (required, nullable; llama-server sends only
    `content`) and without llama-server's token ids."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return choice
    fixed = {"refusal": None, **logprobs} if "refusal" not in logprobs else logprobs
    content = fixed.get("content")
    if (
        isinstance(content, list)
        and _LOGPROB
        and any(isinstance(t, dict) and not _LOGPROB.isdisjoint(t) for t in content)
    ):
        fixed = {**fixed, "content": [_token(t) for t in content]}
    return choice if fixed is logprobs else {**choice, "logprobs": fixed}


def _token(token: Any) -> Any:
    if not isinstance(token, dict):
        return token
    out = strip_private(token, _LOGPROB)
    top = out.get("top_logprobs")
    if isinstance(top, list):
        out = {**out, "top_logprobs": [strip_private(t, _LOGPROB) for t in top]}
    return out


def _chunk_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out = strip_private(choice, _CHOICE)
    delta = out.get("delta")
    if isinstance(delta, dict):
        fixed = _drop_nulls(_drop_nulls(delta, _NOT_NULL_DELTA), _EXTENSIONS_IF_SET)
        if fixed is not delta:
            out = {**out, "delta": fixed}
    return _chat_logprobs(out)


def _completion_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out = strip_private(choice, _CHOICE)
    if "logprobs" not in out:
        out = {**out, "logprobs": None}  # required (nullable)
    return out


def chat_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """A whole `chat.completion` in the document's `CreateChatCompletionResponse` shape."""
    return _choices(_top(answer), _chat_choice)


def chat_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """One `chat.completion.chunk` in `CreateChatCompletionStreamResponse`'s shape."""
    return _choices(_top(chunk), _chunk_choice)


def completion_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """A whole `text_completion` in `CreateCompletionResponse`'s shape."""
    return _choices(_top(answer), _completion_choice)


def completion_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """One streamed `text_completion` event. The document has no schema of its own for them
    (OpenAI streams `CreateCompletionResponse` objects, with `finish_reason: null` until the
    last); the same reshaping as a whole answer."""
    return completion_answer(chunk)


def embeddings_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """`/v1/embeddings` in `CreateEmbeddingResponse`'s shape: only private fields to drop (both
    engines' answers conform otherwise)."""
    return strip_private(answer, _ANSWER)


def model(obj: dict[str, Any]) -> dict[str, Any]:
    """One model object (`GET /v1/models/{id}`, and each of the list) in `Model`'s shape."""
    out = strip_private(obj, _MODEL)
    if out.get("owned_by") is None or out.get("created") is None:
        # Both required; a model object of an engine that left one out still says something.
        out = {
            **out,
            "owned_by": out.get("owned_by") or "inferd",
            "created": out.get("created") or 0,
        }
    return out


def models_list(answer: dict[str, Any]) -> dict[str, Any]:
    """`GET /v1/models` in `ListModelsResponse`'s shape."""
    data = answer.get("data")
    models = (
        [model(m) if isinstance(m, dict) else m for m in data] if isinstance(data, list) else []
    )
    return {**strip_private(answer, _LIST), "object": "list", "data": models}


_ANSWERS = {CHAT: chat_answer, COMPLETIONS: completion_answer, EMBEDDINGS: embeddings_answer}
# The engine routes whose answers are reshaped.
ROUTES = frozenset(_ANSWERS)
_CHUNKS = {CHAT: chat_chunk, COMPLETIONS: completion_chunk}


def answer(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """A whole answer of `route` (the engine route) reshaped; other routes' unchanged."""
    fix = _ANSWERS.get(route)
    return fix(body) if fix is not None else body


# --- stream events, on the raw bytes -----------------------------------------------------------


def _trie(words: list[bytes]) -> bytes:
    """A regular expression matching exactly `words`, as a tree of their common prefixes: a
    failed attempt costs one test per character rather than one per word (Python's engine tries
    the branches of `a|b|c` one after the other). On the stream's hot path: it halves the time
    of a search over a token event."""
    if words == [b""]:
        return b""
    ends = b"" in words
    heads: dict[bytes, list[bytes]] = {}
    for w in words:
        if w:
            heads.setdefault(w[:1], []).append(w[1:])
    branches = [re.escape(h) + _trie(rest) for h, rest in sorted(heads.items())]
    if len(branches) == 1 and not ends:
        return branches[0]
    return b"(?:" + b"|".join(branches) + (b")?" if ends else b")")


# Private fields vLLM streams as `null` in (nearly) every event, removed without parsing, as
# `,"k":null` before `,` or `}`. A private key that comes first in its object (never seen) is
# left to the parse below. One regular expression with a literal prefix, one pass: cheaper than
# a parse (a loop of `in`s, or a look-behind, is not).
_PRIVATE_KEYS = sorted(k.encode() for k in (_CHOICE | _ANSWER) - {"completion_probabilities"})
_NULL_PRIVATE = re.compile(rb',"' + _trie([k + b'":null' for k in _PRIVATE_KEYS]) + rb"(?=[,}])")
# What still needs a parse once those are gone: a private field with a value, a null the
# document refuses, chat logprobs without `refusal` (llama-server's and vLLM's alike: with
# logprobs on, every chat event is parsed). Token events of both engines carry none of these.
_NULLABLE_NOT = sorted(
    k.encode() for k in _NOT_NULL_DELTA | _EXTENSIONS_IF_SET | _NOT_NULL_USAGE | _NOT_NULL_TOP
)
_ALL_PRIVATE = sorted(k.encode() for k in _CHOICE | _ANSWER)
_MARKERS = re.compile(
    b'"' + _trie([k + b'":' for k in _ALL_PRIVATE] + [k + b'":null' for k in _NULLABLE_NOT])
)
_LOGPROBS = b'"logprobs":{'
_REFUSAL = b'"refusal":'


def needs_reshaping(event: bytes, route: str = CHAT) -> bool:
    """Whether raw SSE events (after `drop_null_private`) have anything `chat_chunk` or
    `completion_chunk` would change, other than a completion choice without `logprobs`
    (neither engine streams one)."""
    if _MARKERS.search(event) is not None:
        return True
    return route == CHAT and _LOGPROBS in event and _REFUSAL not in event


def drop_null_private(event: bytes) -> bytes:
    """The engines' private fields that are `null` removed from raw JSON bytes, unparsed."""
    return _NULL_PRIVATE.sub(b"", event)


def stream_events(route: str, chunk: bytes) -> bytes:
    """Complete SSE events (`data: {...}\\n\\n`, one or more) of a stream from `route` (the
    engine route), each in the document's shape. Comments, `[DONE]` and events that are not
    JSON objects pass unchanged; an event that does not parse passes as it was."""
    fix = _CHUNKS.get(route)
    if fix is None:
        return chunk
    chunk = drop_null_private(chunk)
    if _MARKERS.search(chunk) is None and not (route == CHAT and _LOGPROBS in chunk):
        return chunk  # the common case: token events, forwarded without a parse
    out: list[bytes] = []
    for event in chunk.split(b"\n\n"):
        if event.startswith(b"data: {") and needs_reshaping(event, route):
            try:
                data = json.loads(event[6:])
            except ValueError:
                out.append(event)
                continue
            if isinstance(data, dict):
                event = b"data: " + json.dumps(fix(data), separators=(",", ":")).encode()
        out.append(event)
    return b"\n\n".join(out)
