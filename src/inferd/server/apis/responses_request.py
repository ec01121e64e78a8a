"""OpenAI Responses requests checked field by field and turned into chat-completions parts: the
request half of `server.apis.responses`. Everything the translation cannot honour (OpenAI's
hosted tools, reasoning options, background mode, stored prompts, images, ...) is refused by
name; the rest becomes chat's messages, `tools`, `tool_choice` and `response_format`, with what
the Response echoes back.
"""

from __future__ import annotations

import json
from typing import Any

from inferd.errors import InvalidRequestError
from inferd.server.apis.schemas import schema_error

# Request fields OpenAI defines that need something inferd does not have: each is accepted only
# when unset, null or one of the listed values, and refused by name otherwise.
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "reasoning": ((), "reasoning options cannot be set on the served models"),
    "include": (([],), "inferd has no extra output data to include"),
    "background": ((False,), "background responses are not supported; use stream=true"),
    "truncation": (("disabled",), "inferd never drops input; send input that fits the context"),
    "service_tier": (("auto", "default"), "inferd has one service tier"),
    "top_logprobs": ((0,), "log probabilities are not translated to Responses"),
    "prompt": ((), "stored prompt templates are not supported; send the input itself"),
    "conversation": ((), "conversations are not supported; use previous_response_id"),
    "context_management": ((), "context compaction is not supported"),
    "moderation": ((), "per-request moderation is not supported (guardrails are the server's)"),
    "image": ((), "image context options are not supported (inputs are text only)"),
    "access_programs": ((), "access programs are OpenAI's"),
    "background_options": ((), "background responses are not supported"),
    "prompt_cache_options": ((), "prompt-cache breakpoints are not supported"),
}
# Fields translated onto chat completions or echoed in the Response.
_TRANSLATED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "metadata",
        "store",
        "previous_response_id",
        "stream",
        "stream_options",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "max_tool_calls",
    }
)
_KNOWN = _TRANSLATED | _REFUSED.keys()
# Simple fields: the types each may have (besides null) and how to say it.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "instructions": ((str,), "a string"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "store": ((bool,), "a boolean"),
    "stream": ((bool,), "a boolean"),
    "previous_response_id": ((str,), "a string"),
    "user": ((str,), "a string"),
    "safety_identifier": ((str,), "a string"),
    "prompt_cache_key": ((str,), "a string"),
    "max_tool_calls": ((int,), "an integer"),
}
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_FUNCTION_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
MAX_METADATA = 16


def fail(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def check_fields(payload: dict[str, Any]) -> None:
    """Unknown fields, fields needing what inferd lacks, and the simple fields' types."""
    for name in payload:
        if name not in _KNOWN:
            raise fail(f"unknown field {name!r}: /v1/responses does not accept it", name)
    for name, (allowed, why) in _REFUSED.items():
        value = payload.get(name)
        if value is not None and not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise fail(f"{name}={json.dumps(value)} is not supported: {why}", name)
    for name, (types, what) in _TYPES.items():
        value = payload.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise fail(f"{name} must be {what}", name)
    limit = payload.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise fail("max_output_tokens must be a positive integer", "max_output_tokens")
    options = payload.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_obfuscation"}:
            raise fail("stream_options may only hold include_obfuscation", "stream_options")
        if payload.get("stream") is not True:
            raise fail("stream_options is only allowed with stream=true", "stream_options")
    retention = payload.get("prompt_cache_retention")
    if retention not in (None, "in_memory", "24h"):
        raise fail("prompt_cache_retention must be 'in_memory' or '24h'", "prompt_cache_retention")


def metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys up to 64 and values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail("metadata must be an object of string keys and values", "metadata")
    if len(value) > MAX_METADATA:
        raise fail(
            f"metadata has {len(value)} keys; at most {MAX_METADATA} are allowed", "metadata"
        )
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 64:
            raise fail(
                f"metadata key {key!r} must be a string of at most 64 characters", "metadata"
            )
        if not isinstance(item, str) or len(item) > 512:
            raise fail(f"metadata[{key!r}] must be a string of at most 512 characters", "metadata")
    return dict(value)


def _text_of(part: Any, at: str) -> str:
    """The text of one content part; only text parts translate onto a text-only chat."""
    if not isinstance(part, dict):
        raise fail(f"{at} must be a content part object", at)
    kind = part.get("type")
    key = {"input_text": "text", "output_text": "text", "refusal": "refusal"}.get(str(kind))
    if key is None:
        raise fail(
            f"{at}: content parts of type {kind!r} are not supported "
            "(text only: input_text, output_text)",
            f"{at}.type",
        )
    text = part.get(key)
    if not isinstance(text, str):
        raise fail(f"{at}.{key} must be a string", f"{at}.{key}")
    return text


def _content(value: Any, at: str) -> str | list[dict[str, Any]]:
    """A message's content as chat takes it: a string, or text parts when there are several."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise fail(f"{at} must be a string or a list of content parts", at)
    texts = [_text_of(part, f"{at}[{j}]") for j, part in enumerate(value)]
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": text} for text in texts]


def _string(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise fail(f"{at}.{key} must be a string", f"{at}.{key}")
    return value


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], at: str) -> None:
    call = {
        "id": _string(item, "call_id", at),
        "type": "function",
        "function": {
            "name": _string(item, "name", at),
            "arguments": _string(item, "arguments", at),
        },
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        # A chat assistant turn carries its text and all its (parallel) calls together.
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def items_to_messages(items: list[Any], where: str) -> list[dict[str, Any]]:
    """Responses input items (or a stored response's output items) as chat messages. Reasoning
    items are dropped: chat engines take no reasoning as input, as chat clients drop it."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise fail(f"{at} must be an input item object", at)
        kind = item.get("type", "message")  # an easy input message has no type
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise fail(f"{at}.role must be one of {', '.join(_ROLES)}", f"{at}.role")
            content = _content(item.get("content"), f"{at}.content")
            messages.append({"role": _ROLES[role], "content": content})
        elif kind == "function_call":
            _add_call(messages, item, at)
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{at}.output")
            call_id = _string(item, "call_id", at)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind != "reasoning":
            raise fail(
                f"{at}: input items of type {kind!r} are not supported (message, function_call, "
                "function_call_output and reasoning are)",
                f"{at}.type",
            )
    return messages


def input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise fail("input must be a string or a list of input items", "input")
    return items_to_messages(value, "input")


def _function_tool(tool: Any, at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One function tool as chat's tool and as the Response echoes it."""
    if not isinstance(tool, dict):
        raise fail(f"{at} must be a tool object", "tools")
    kind = tool.get("type")
    if kind != "function":
        raise fail(
            f"{at}: tools of type {kind!r} are not supported: inferd serves function tools "
            "(type 'function') only, OpenAI's hosted tools run on OpenAI's side",
            "tools",
        )
    extra = sorted(set(tool) - _FUNCTION_TOOL_KEYS)
    if extra:
        raise fail(f"{at}.{extra[0]} is not supported on function tools", "tools")
    name, description = tool.get("name"), tool.get("description")
    parameters, strict = tool.get("parameters"), tool.get("strict")
    if not isinstance(name, str) or not name:
        raise fail(f"{at}.name must be a non-empty string", "tools")
    if description is not None and not isinstance(description, str):
        raise fail(f"{at}.description must be a string", "tools")
    if parameters is not None and (error := schema_error(parameters)) is not None:
        raise fail(f"{at}.parameters{error}", "tools")
    if strict is not None and not isinstance(strict, bool):
        raise fail(f"{at}.strict must be a boolean", "tools")
    given = {"description": description, "parameters": parameters, "strict": strict}
    function = {"name": name, **{k: v for k, v in given.items() if v is not None}}
    echo = {"type": "function", "name": name, **given}
    return {"type": "function", "function": function}, echo


def tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise fail("tools must be a list of tools", "tools")
    pairs = [_function_tool(tool, f"tools[{i}]") for i, tool in enumerate(value)]
    return [chat for chat, _ in pairs], [echo for _, echo in pairs]


def tool_choice(value: Any, names: set[str]) -> tuple[Any, Any]:
    """`tool_choice` as chat takes it (None: not sent) and as the Response echoes it."""
    if value is None:
        return None, "auto"
    if value in ("none", "auto", "required"):
        if value == "required" and not names:
            raise fail("tool_choice='required' needs at least one tool in tools", "tool_choice")
        return value, value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or name not in names:
            raise fail(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return {"type": "function", "function": {"name": name}}, {"type": "function", "name": name}
    kind = value.get("type") if isinstance(value, dict) else value
    raise fail(
        f"tool_choice {kind!r} is not supported: use 'none', 'auto', 'required' or "
        "{'type': 'function', 'name': ...}",
        "tool_choice",
    )


def _json_schema(fmt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    name, schema = fmt.get("name"), fmt.get("schema")
    strict, description = fmt.get("strict"), fmt.get("description")
    if not isinstance(name, str) or not name:
        raise fail("text.format.name must be a non-empty string", "text.format.name")
    if (error := schema_error(schema)) is not None:
        raise fail(f"text.format.schema{error}", "text.format.schema")
    if strict is not None and not isinstance(strict, bool):
        raise fail("text.format.strict must be a boolean", "text.format.strict")
    if description is not None and not isinstance(description, str):
        raise fail("text.format.description must be a string", "text.format.description")
    given = {"description": description, "strict": strict}
    inner = {"name": name, "schema": schema, **{k: v for k, v in given.items() if v is not None}}
    # The published schema lets `strict` be null but not `description`: echoed when given.
    echo = {"type": "json_schema", **inner, "strict": strict}
    return {"type": "json_schema", "json_schema": inner}, echo


def text_format(value: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """`text` as chat's `response_format` (None: plain text) and as the Response echoes it."""
    plain = {"format": {"type": "text"}}
    if value is None:
        return None, plain
    if not isinstance(value, dict):
        raise fail("text must be an object", "text")
    extra = sorted(set(value) - {"format", "verbosity"})
    if extra:
        raise fail(f"text.{extra[0]} is not supported", f"text.{extra[0]}")
    if value.get("verbosity") is not None:
        raise fail("text.verbosity is not supported by the served models", "text.verbosity")
    fmt = value.get("format")
    if fmt is None:
        return None, plain
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, plain
    if kind == "json_object":
        return {"type": "json_object"}, {"format": {"type": "json_object"}}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        chat, echo = _json_schema(fmt)
        return chat, {"format": echo}
    raise fail(
        f"text.format type {kind!r} is not supported (text, json_object, json_schema are)",
        "text.format.type",
    )
