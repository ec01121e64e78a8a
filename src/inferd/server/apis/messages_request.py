"""Anthropic's Messages requests checked field by field and turned into chat completions: the
request half of `server.apis.messages`.

Unknown or unsupported fields, block types and server tools are refused by name (as Anthropic's
own API refuses extra inputs); `chat_request` builds the one chat-completions request a Messages
request becomes (system prompt, turns, `tool_use`/`tool_result` as `tool_calls`/`tool`
messages, custom tools as functions, structured output), and `count_tokens_request` the same
prompt without sampling fields for the engine's tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from inferd.errors import InvalidRequestError
from inferd.server.apis.schemas import schema_error

# Top-level fields of a Messages request this translation reads.
_MESSAGE_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "stream",
        "thinking",
        "service_tier",
        "cache_control",
        "output_config",
    }
)
# count_tokens takes the prompt only: no max_tokens, stream, sampling or metadata.
_COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control"}
)
# Anthropic fields that exist but that an engine behind chat completions cannot honour; each is
# refused with its reason rather than as an unknown field.
_UNSUPPORTED_FIELDS = {
    "container": "code-execution containers run on Anthropic's servers",
    "mcp_servers": "this server does not call remote MCP servers",
    "context_management": "server-side context editing is not supported",
    "inference_geo": "there is one inference location",
    "speed": "there is one inference speed",
    "diagnostics": "prompt-cache diagnostics are not supported",
}
# Content block types of Anthropic's API that cannot be translated; anything else is unknown.
_UNSUPPORTED_BLOCKS = {
    "image": "images are not supported",
    "document": "documents are not supported",
    "search_result": "search results are not supported",
    "server_tool_use": "server tools are not supported",
    "web_search_tool_result": "server tools are not supported",
    "web_fetch_tool_result": "server tools are not supported",
    "code_execution_tool_result": "server tools are not supported",
    "bash_code_execution_tool_result": "server tools are not supported",
    "text_editor_code_execution_tool_result": "server tools are not supported",
    "tool_search_tool_result": "server tools are not supported",
    "mcp_tool_use": "MCP tools are not supported",
    "mcp_tool_result": "MCP tools are not supported",
    "container_upload": "containers are not supported",
    "tool_reference": "tool references are not supported",
}
# The keys each accepted block type may carry (Anthropic refuses extra keys too).
_BLOCK_KEYS = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
_TOOL_KEYS = frozenset({"name", "description", "input_schema", "type", "cache_control"})
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Chat finish reasons with an Anthropic stop reason of their own; the rest read as end_turn.
STOP_REASONS = {"length": "max_tokens", "content_filter": "refusal"}
# Anthropic's error type per HTTP status (docs: "Errors"). 503 is inferd's "try again later"
# (overloaded, draining, engine not ready), which Anthropic's clients know as overloaded_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _fail(message: str, param: str) -> NoReturn:
    raise InvalidRequestError(message, param=param)


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            _fail(f"{where}.{key}: unknown field", f"{where}.{key}")


def _number(payload: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        _fail(f"{name} must be a number from {low:g} to {high:g}", name)
    return value


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{name} must be an integer of at least {minimum}", name)
    return value


# --- the request --------------------------------------------------------------------------


def _top_level(payload: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in payload:
        if key in _UNSUPPORTED_FIELDS:
            _fail(f"{key} is not supported: {_UNSUPPORTED_FIELDS[key]}", key)
        if key not in allowed:
            _fail(f"{key}: unknown field", key)


def _text_block(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        _fail(f"{where}.text must be a string", f"{where}.text")
    return text


def _block(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    """One content block, its type known and accepted here, its keys those of its type."""
    if not isinstance(value, dict):
        _fail(f"{where} must be a content block object", where)
    kind = value.get("type")
    if not isinstance(kind, str):
        _fail(f"{where}.type must be a string", f"{where}.type")
    if kind in _UNSUPPORTED_BLOCKS:
        _fail(
            f"{where}: content block type '{kind}' is not supported: {_UNSUPPORTED_BLOCKS[kind]}",
            f"{where}.type",
        )
    if kind not in _BLOCK_KEYS:
        _fail(f"{where}: unknown content block type '{kind}'", f"{where}.type")
    if kind not in allowed:
        _fail(f"{where}: a '{kind}' block cannot appear here", f"{where}.type")
    # Keys sent as null say nothing: the SDK's own blocks, dumped and sent back as the next
    # turn (the usual way to answer a tool_use), carry its optional fields as nulls.
    block: dict[str, Any] = {k: v for k, v in value.items() if v is not None}
    _check_keys(block, _BLOCK_KEYS[kind], where)
    return block


def _blocks(value: Any, where: str, allowed: frozenset[str]) -> list[dict[str, Any]]:
    """A content field as a list of blocks (a string is one text block)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        _fail(f"{where} must be a string or a list of content blocks", where)
    return [_block(item, f"{where}[{i}]", allowed) for i, item in enumerate(value)]


def _system(value: Any) -> str | None:
    if value is None:
        return None
    blocks = _blocks(value, "system", frozenset({"text"}))
    # Blocks are separate paragraphs to the model; one system message keeps templates happy.
    return "\n\n".join(_text_block(b, f"system[{i}]") for i, b in enumerate(blocks))


def _text_content(texts: list[str]) -> str | list[dict[str, Any]]:
    # One block stays a plain string, the shape every chat template renders; several stay
    # separate text parts, as the client sent them.
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": t} for t in texts]


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        _fail(f"{where}.tool_use_id must be a non-empty string", f"{where}.tool_use_id")
    content = block.get("content", "")
    parts = _blocks(content, f"{where}.content", frozenset({"text"}))
    text = "\n".join(_text_block(p, f"{where}.content[{i}]") for i, p in enumerate(parts))
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        _fail(f"{where}.is_error must be a boolean", f"{where}.is_error")
    # Chat's tool messages carry no error flag; the model still has to learn the call failed.
    if is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


_USER_BLOCKS = frozenset({"text", "tool_result"})
_ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})


def _user_turn(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as `tool` messages first (chat wants them right after
    the assistant's calls), then its text as one user message."""
    blocks = _blocks(content, where, _USER_BLOCKS)
    tools = [
        _tool_result(b, f"{where}[{i}]") for i, b in enumerate(blocks) if b["type"] == "tool_result"
    ]
    texts = [_text_block(b, f"{where}[{i}]") for i, b in enumerate(blocks) if b["type"] == "text"]
    if texts or not tools:
        return [*tools, {"role": "user", "content": _text_content(texts) if texts else ""}]
    return tools


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, args = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id:
        _fail(f"{where}.id must be a non-empty string", f"{where}.id")
    if not isinstance(name, str) or not name:
        _fail(f"{where}.name must be a non-empty string", f"{where}.name")
    if not isinstance(args, dict):
        _fail(f"{where}.input must be an object", f"{where}.input")
    arguments = json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _assistant_turn(content: Any, where: str) -> dict[str, Any]:
    blocks = _blocks(content, where, _ASSISTANT_BLOCKS)
    texts = [_text_block(b, f"{where}[{i}]") for i, b in enumerate(blocks) if b["type"] == "text"]
    calls = [
        _tool_call(b, f"{where}[{i}]") for i, b in enumerate(blocks) if b["type"] == "tool_use"
    ]
    # Earlier turns' thinking is dropped, as Anthropic drops it from the prompt itself.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        _fail("messages must be a non-empty list", "messages")
    chat: list[dict[str, Any]] = []
    for i, turn in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            _fail(f"{where} must be an object", where)
        _check_keys(turn, frozenset({"role", "content"}), where)
        role = turn.get("role")
        if "content" not in turn:
            _fail(f"{where}.content is required", f"{where}.content")
        if role == "user":
            chat.extend(_user_turn(turn["content"], f"{where}.content"))
        elif role == "assistant":
            chat.append(_assistant_turn(turn["content"], f"{where}.content"))
        else:
            _fail(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
    return chat


def _check_schema(schema: Any, where: str) -> None:
    """A tool's input_schema must be a JSON Schema for an object, as Anthropic requires."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        _fail(f"{where} must be a JSON Schema object with type 'object'", where)
    error = schema_error(schema)
    if error is not None:
        _fail(f"{where}{error}", where)


def _tool(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(f"{where} must be an object", where)
    kind = value.get("type")
    if kind not in (None, "custom"):
        _fail(
            f"{where}: server tool '{kind}' is not supported; only custom tools "
            "(name, description, input_schema)",
            f"{where}.type",
        )
    _check_keys(value, _TOOL_KEYS, where)
    name = value.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        _fail(f"{where}.name must match ^[a-zA-Z0-9_-]{{1,128}}$", f"{where}.name")
    _check_schema(value.get("input_schema"), f"{where}.input_schema")
    function: dict[str, Any] = {"name": name, "parameters": value["input_schema"]}
    description = value.get("description")
    if description is not None:
        if not isinstance(description, str):
            _fail(f"{where}.description must be a string", f"{where}.description")
        function["description"] = description
    return {"type": "function", "function": function}


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail("tools must be a list", "tools")
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(value)]
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            _fail(f"tools[{i}].name: tool '{name}' is defined twice", f"tools[{i}].name")
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat fields for `tool_choice` (tools narrowed to one for a named tool)."""
    if value is None:
        return {"tools": tools} if tools else {}
    if not isinstance(value, dict):
        _fail("tool_choice must be an object", "tool_choice")
    kind = value.get("type")
    allowed = {"auto", "any", "tool", "none"}
    if kind not in allowed:
        _fail("tool_choice.type must be one of auto, any, tool, none", "tool_choice.type")
    keys = {"type", "name"} if kind == "tool" else {"type"}
    if kind != "none":
        keys.add("disable_parallel_tool_use")
    _check_keys(value, frozenset(keys), "tool_choice")
    if kind == "none":
        return {"tools": tools, "tool_choice": "none"} if tools else {}
    if not tools:
        _fail("tool_choice needs tools", "tool_choice")
    fields: dict[str, Any] = {"tools": tools, "tool_choice": "auto"}
    if kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "tool":
        name = value.get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            _fail(f"tool_choice.name: no tool named {name!r}", "tool_choice.name")
        fields.update(tools=named, tool_choice="required")
    serial = value.get("disable_parallel_tool_use", False)
    if not isinstance(serial, bool):
        _fail(
            "tool_choice.disable_parallel_tool_use must be a boolean",
            "tool_choice.disable_parallel_tool_use",
        )
    if serial:
        fields["parallel_tool_calls"] = False
    return fields


def _thinking(value: Any, max_tokens: int | None) -> bool | None:
    """Whether the client enabled thinking; None when it did not say."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("enabled", "disabled", "adaptive"):
        _fail("thinking.type must be enabled, disabled or adaptive", "thinking.type")
    if value["type"] == "disabled":
        _check_keys(value, frozenset({"type"}), "thinking")
        return False
    if value["type"] == "adaptive":
        _check_keys(value, frozenset({"type", "display"}), "thinking")
        return True
    _check_keys(value, frozenset({"type", "budget_tokens", "display"}), "thinking")
    budget = _positive_int(value.get("budget_tokens"), "thinking.budget_tokens", 1024)
    if max_tokens is not None and budget >= max_tokens:
        _fail("thinking.budget_tokens must be less than max_tokens", "thinking.budget_tokens")
    return True


def _prompt(payload: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The chat fields that make the prompt: messages, tools and how the template ends."""
    messages = _messages(payload.get("messages"))
    system = _system(payload.get("system"))
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    fields: dict[str, Any] = {"messages": messages}
    fields.update(_tool_choice(payload.get("tool_choice"), _tools(payload.get("tools"))))
    last = messages[-1]
    if last["role"] == "assistant":
        if "tool_calls" in last:
            _fail(
                "the last message is an assistant turn with tool_use: answer it with "
                "tool_result blocks in a user turn",
                "messages",
            )
        # Prefill: the answer continues the client's partial assistant turn.
        fields.update(add_generation_prompt=False, continue_final_message=True)
    thinking = _thinking(payload.get("thinking"), max_tokens)
    if thinking is not None:
        # Templates that can switch reasoning (Qwen3 and the like) read this; others ignore it.
        fields["chat_template_kwargs"] = {"enable_thinking": thinking}
    return fields


def _output_config(value: Any) -> dict[str, Any]:
    """Structured outputs (`output_config.format`, a JSON schema) as chat's `response_format`:
    both engines constrain decoding to it. Effort levels have no counterpart: refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail("output_config must be an object", "output_config")
    _check_keys(value, frozenset({"format", "effort"}), "output_config")
    if value.get("effort") is not None:
        _fail(
            "output_config.effort is not supported: there is one effort level",
            "output_config.effort",
        )
    spec = value.get("format")
    if spec is None:
        return {}
    if not isinstance(spec, dict) or spec.get("type") != "json_schema":
        _fail("output_config.format.type must be json_schema", "output_config.format")
    _check_keys(spec, frozenset({"type", "schema"}), "output_config.format")
    _check_schema(spec.get("schema"), "output_config.format.schema")
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": spec["schema"], "strict": True},
        }
    }


def _metadata(value: Any) -> None:
    # Validated only: llama-server has no `user` field, and inferd logs requests by key.
    if value is None:
        return
    if not isinstance(value, dict):
        _fail("metadata must be an object", "metadata")
    _check_keys(value, frozenset({"user_id"}), "metadata")
    user = value.get("user_id")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        _fail("metadata.user_id must be a string of at most 256 characters", "metadata.user_id")


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        _fail("stop_sequences must be a list of non-empty strings", "stop_sequences")
    return value


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        _fail("model must be a non-empty string", "model")
    return model


def chat_request(payload: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat-completions request for a Messages request (checked as it is built)."""
    _top_level(payload, _MESSAGE_FIELDS)
    _model(payload)
    if "max_tokens" not in payload:
        _fail("max_tokens: field required", "max_tokens")
    max_tokens = _positive_int(payload["max_tokens"], "max_tokens")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        _fail("stream must be a boolean", "stream")
    if payload.get("service_tier", "auto") not in ("auto", "standard_only"):
        _fail("service_tier must be auto or standard_only", "service_tier")
    _metadata(payload.get("metadata"))
    chat: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    chat.update(_prompt(payload, max_tokens))
    chat.update(_output_config(payload.get("output_config")))
    stops = _stop_sequences(payload.get("stop_sequences"))
    if stops:
        chat["stop"] = stops
    for name in ("temperature", "top_p"):
        value = _number(payload, name, 0.0, 1.0)
        if value is not None:
            chat[name] = value
    if payload.get("top_k") is not None:
        chat["top_k"] = _positive_int(payload["top_k"], "top_k", 0)
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def count_tokens_request(payload: dict[str, Any]) -> dict[str, Any]:
    """The chat-shaped prompt of a count_tokens request, built exactly as `request` builds it
    (system message, tool messages, narrowed tools, prefill), for the engine's tokenizer: vLLM's
    `/tokenize` and llama-server's `/v1/chat/completions/input_tokens` both take it."""
    _top_level(payload, _COUNT_FIELDS)
    body: dict[str, Any] = {"model": _model(payload), "add_generation_prompt": True}
    prompt = _prompt(payload, None)
    # tool_choice and parallel_tool_calls shape sampling, not the prompt's tokens.
    prompt.pop("tool_choice", None)
    prompt.pop("parallel_tool_calls", None)
    body.update(prompt)
    return body
