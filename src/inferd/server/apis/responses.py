"""OpenAI's Responses API (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`) as a
translation onto the engine's chat completions. A request's `instructions` and `input` items become
chat messages (a `previous_response_id` puts the stored conversation and its output first), its
function tools, `tool_choice` and `text.format` become chat's `tools`, `tool_choice` and
`response_format`; the chat answer becomes a Response object (reasoning, message and
function-call output items), and a chat stream becomes Responses' semantic events, numbered from
0 and closed by `response.completed`, whose Response says `status: "incomplete"` (and why) when
the engine stopped at `max_output_tokens` or an output rail. The stream closes with
`response.completed` even then, as vLLM's own Responses server does: the official SDK's stream
helper (`client.responses.stream(...).get_final_response()`) and the clients built on it only
accept that event as the end of a stream. Everything this translation cannot honour is refused by
name (OpenAI's hosted tools, reasoning options, background mode, stored prompts, images, ...)
rather than silently ignored. Stored responses live in a `ResponseStore`, in memory only.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from inferd.errors import InvalidRequestError, NotFoundError, PreviousResponseNotFoundError
from inferd.server.apis.response_store import ResponseStore
from inferd.server.apis.schemas import schema_error
from inferd.server.apis.translation import SSE, Translation

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
# Chat finish reasons that leave a Response incomplete, and the reason OpenAI gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
MAX_METADATA = 16


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _fail(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _check_fields(payload: dict[str, Any]) -> None:
    """Unknown fields, fields needing what inferd lacks, and the simple fields' types."""
    for name in payload:
        if name not in _KNOWN:
            raise _fail(f"unknown field {name!r}: /v1/responses does not accept it", name)
    for name, (allowed, why) in _REFUSED.items():
        value = payload.get(name)
        if value is not None and not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise _fail(f"{name}={json.dumps(value)} is not supported: {why}", name)
    for name, (types, what) in _TYPES.items():
        value = payload.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _fail(f"{name} must be {what}", name)
    limit = payload.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _fail("max_output_tokens must be a positive integer", "max_output_tokens")
    options = payload.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_obfuscation"}:
            raise _fail("stream_options may only hold include_obfuscation", "stream_options")
        if payload.get("stream") is not True:
            raise _fail("stream_options is only allowed with stream=true", "stream_options")
    retention = payload.get("prompt_cache_retention")
    if retention not in (None, "in_memory", "24h"):
        raise _fail("prompt_cache_retention must be 'in_memory' or '24h'", "prompt_cache_retention")


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys up to 64 and values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail("metadata must be an object of string keys and values", "metadata")
    if len(value) > MAX_METADATA:
        raise _fail(
            f"metadata has {len(value)} keys; at most {MAX_METADATA} are allowed", "metadata"
        )
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 64:
            raise _fail(
                f"metadata key {key!r} must be a string of at most 64 characters", "metadata"
            )
        if not isinstance(item, str) or len(item) > 512:
            raise _fail(f"metadata[{key!r}] must be a string of at most 512 characters", "metadata")
    return dict(value)


def _text_of(part: Any, at: str) -> str:
    """The text of one content part; only text parts translate onto a text-only chat."""
    if not isinstance(part, dict):
        raise _fail(f"{at} must be a content part object", at)
    kind = part.get("type")
    key = {"input_text": "text", "output_text": "text", "refusal": "refusal"}.get(str(kind))
    if key is None:
        raise _fail(
            f"{at}: content parts of type {kind!r} are not supported "
            "(text only: input_text, output_text)",
            f"{at}.type",
        )
    text = part.get(key)
    if not isinstance(text, str):
        raise _fail(f"{at}.{key} must be a string", f"{at}.{key}")
    return text


def _content(value: Any, at: str) -> str | list[dict[str, Any]]:
    """A message's content as chat takes it: a string, or text parts when there are several."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _fail(f"{at} must be a string or a list of content parts", at)
    texts = [_text_of(part, f"{at}[{j}]") for j, part in enumerate(value)]
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": text} for text in texts]


def _string(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _fail(f"{at}.{key} must be a string", f"{at}.{key}")
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
            raise _fail(f"{at} must be an input item object", at)
        kind = item.get("type", "message")  # an easy input message has no type
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise _fail(f"{at}.role must be one of {', '.join(_ROLES)}", f"{at}.role")
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
            raise _fail(
                f"{at}: input items of type {kind!r} are not supported (message, function_call, "
                "function_call_output and reasoning are)",
                f"{at}.type",
            )
    return messages


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _fail("input must be a string or a list of input items", "input")
    return items_to_messages(value, "input")


def _function_tool(tool: Any, at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One function tool as chat's tool and as the Response echoes it."""
    if not isinstance(tool, dict):
        raise _fail(f"{at} must be a tool object", "tools")
    kind = tool.get("type")
    if kind != "function":
        raise _fail(
            f"{at}: tools of type {kind!r} are not supported: inferd serves function tools "
            "(type 'function') only, OpenAI's hosted tools run on OpenAI's side",
            "tools",
        )
    extra = sorted(set(tool) - _FUNCTION_TOOL_KEYS)
    if extra:
        raise _fail(f"{at}.{extra[0]} is not supported on function tools", "tools")
    name, description = tool.get("name"), tool.get("description")
    parameters, strict = tool.get("parameters"), tool.get("strict")
    if not isinstance(name, str) or not name:
        raise _fail(f"{at}.name must be a non-empty string", "tools")
    if description is not None and not isinstance(description, str):
        raise _fail(f"{at}.description must be a string", "tools")
    if parameters is not None and (error := schema_error(parameters)) is not None:
        raise _fail(f"{at}.parameters{error}", "tools")
    if strict is not None and not isinstance(strict, bool):
        raise _fail(f"{at}.strict must be a boolean", "tools")
    given = {"description": description, "parameters": parameters, "strict": strict}
    function = {"name": name, **{k: v for k, v in given.items() if v is not None}}
    echo = {"type": "function", "name": name, **given}
    return {"type": "function", "function": function}, echo


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise _fail("tools must be a list of tools", "tools")
    pairs = [_function_tool(tool, f"tools[{i}]") for i, tool in enumerate(value)]
    return [chat for chat, _ in pairs], [echo for _, echo in pairs]


def _tool_choice(value: Any, names: set[str]) -> tuple[Any, Any]:
    """`tool_choice` as chat takes it (None: not sent) and as the Response echoes it."""
    if value is None:
        return None, "auto"
    if value in ("none", "auto", "required"):
        if value == "required" and not names:
            raise _fail("tool_choice='required' needs at least one tool in tools", "tool_choice")
        return value, value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or name not in names:
            raise _fail(
                f"tool_choice names function {name!r}, which is not in tools", "tool_choice"
            )
        return {"type": "function", "function": {"name": name}}, {"type": "function", "name": name}
    kind = value.get("type") if isinstance(value, dict) else value
    raise _fail(
        f"tool_choice {kind!r} is not supported: use 'none', 'auto', 'required' or "
        "{'type': 'function', 'name': ...}",
        "tool_choice",
    )


def _json_schema(fmt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    name, schema = fmt.get("name"), fmt.get("schema")
    strict, description = fmt.get("strict"), fmt.get("description")
    if not isinstance(name, str) or not name:
        raise _fail("text.format.name must be a non-empty string", "text.format.name")
    if (error := schema_error(schema)) is not None:
        raise _fail(f"text.format.schema{error}", "text.format.schema")
    if strict is not None and not isinstance(strict, bool):
        raise _fail("text.format.strict must be a boolean", "text.format.strict")
    if description is not None and not isinstance(description, str):
        raise _fail("text.format.description must be a string", "text.format.description")
    given = {"description": description, "strict": strict}
    inner = {"name": name, "schema": schema, **{k: v for k, v in given.items() if v is not None}}
    # The published schema lets `strict` be null but not `description`: echoed when given.
    echo = {"type": "json_schema", **inner, "strict": strict}
    return {"type": "json_schema", "json_schema": inner}, echo


def _text(value: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """`text` as chat's `response_format` (None: plain text) and as the Response echoes it."""
    plain = {"format": {"type": "text"}}
    if value is None:
        return None, plain
    if not isinstance(value, dict):
        raise _fail("text must be an object", "text")
    extra = sorted(set(value) - {"format", "verbosity"})
    if extra:
        raise _fail(f"text.{extra[0]} is not supported", f"text.{extra[0]}")
    if value.get("verbosity") is not None:
        raise _fail("text.verbosity is not supported by the served models", "text.verbosity")
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
    raise _fail(
        f"text.format type {kind!r} is not supported (text, json_object, json_schema are)",
        "text.format.type",
    )


@dataclass
class _Item:
    """One output item as it is built: a message's text, a reasoning text, or a call's
    arguments (`text`), with its place in `output` once it is there."""

    kind: str  # "message" | "reasoning" | "function_call"
    id: str
    text: str = ""
    call_id: str = ""
    name: str = ""
    status: str = "in_progress"
    index: int = -1

    def part(self) -> dict[str, Any]:
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def render(self, *, opened: bool = False) -> dict[str, Any]:
        """The item as the Response shows it; `opened`: as `output_item.added` announces it,
        before any content."""
        if self.kind == "function_call":
            return {
                "id": self.id,
                "type": "function_call",
                "status": self.status,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": "" if opened else self.text,
            }
        content = [] if opened else [self.part()]
        if self.kind == "reasoning":
            return {
                "id": self.id,
                "type": "reasoning",
                "status": self.status,
                "summary": [],
                "content": content,
            }
        return {
            "id": self.id,
            "type": "message",
            "status": self.status,
            "role": "assistant",
            "content": content,
        }


def _reasoning(message: dict[str, Any]) -> str:
    """The reasoning text of a chat message or delta: llama.cpp calls it `reasoning_content`,
    vLLM `reasoning`."""
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


def _usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def _answer_items(message: dict[str, Any]) -> list[_Item]:
    """A whole chat message's output items: reasoning, then the message, then each call. A
    message item is there whenever there is text or no call, so `output_text` always exists."""
    items: list[_Item] = []
    reasoning = _reasoning(message)
    if reasoning:
        items.append(_Item("reasoning", new_id("rs"), reasoning))
    content = message.get("content")
    calls = message.get("tool_calls") or []
    if content or not calls:
        items.append(_Item("message", new_id("msg"), content if isinstance(content, str) else ""))
    for call in calls:
        function = call.get("function") or {}
        items.append(
            _Item(
                "function_call",
                new_id("fc"),
                str(function.get("arguments") or ""),
                call_id=str(call.get("id") or new_id("call")),
                name=str(function.get("name") or ""),
            )
        )
    return items


class ResponsesTranslation(Translation):
    """One `/v1/responses` request. `request()` checks the whole request (raising
    `InvalidRequestError` naming the field, or `PreviousResponseNotFoundError`) and builds the
    chat request; the other methods need it built and build it first if the front has not.
    `response` is the last Response built (by `answer`, `end` or `error_event`): after a stream,
    the front passes it to `finished` to store it. Once a stream is closed (`end`, or
    `error_event`), later calls answer no events: the relay may still pass on the engine's
    `[DONE]` after an error."""

    api = "openai"
    done_marker = False
    # Chat fields of the translated request and the Responses fields they come from, for the
    # front to name the client's field when a check of the chat request (limits, the engine)
    # refuses one.
    client_params: ClassVar[dict[str, str]] = {
        "max_tokens": "max_output_tokens",
        "messages": "input",
        "response_format": "text.format",
    }

    def __init__(self, payload: dict[str, Any], model: str, store: ResponseStore) -> None:
        super().__init__(payload, model)
        self.store = store
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.response: dict[str, Any] | None = None
        self._chat: dict[str, Any] | None = None
        self._conversation: list[dict[str, Any]] = []  # without instructions: what is stored
        self._echo: dict[str, Any] = {}
        # Stream state.
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._failed = False

    @classmethod
    def create(cls, payload: dict[str, Any], model: str, **context: Any) -> ResponsesTranslation:
        return cls(payload, model, context["store"])

    def streamed(self) -> dict[str, Any] | None:
        return self.response

    # The request.

    def request(self) -> dict[str, Any]:
        if self._chat is None:
            self._chat = self._build()
        return self._chat

    def _build(self) -> dict[str, Any]:
        payload = self.payload
        _check_fields(payload)
        metadata = _metadata(payload.get("metadata"))
        chat_tools, echo_tools = _tools(payload.get("tools"))
        names = {tool["name"] for tool in echo_tools}
        chat_choice, echo_choice = _tool_choice(payload.get("tool_choice"), names)
        response_format, echo_text = _text(payload.get("text"))
        if "input" not in payload:
            raise _fail("input is required", "input")
        self._conversation = self._previous() + _input_messages(payload["input"])
        if not self._conversation:
            raise _fail("input must hold at least one message", "input")
        instructions = payload.get("instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        chat: dict[str, Any] = {"model": self.model, "messages": system + self._conversation}
        if self.stream:
            # Usage arrives in a last chunk of its own: the Response needs it before closing.
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        for ours, theirs in (
            ("max_output_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("parallel_tool_calls", "parallel_tool_calls"),
        ):
            if payload.get(ours) is not None:
                chat[theirs] = payload[ours]
        if chat_tools:
            chat["tools"] = chat_tools
        if chat_choice is not None:
            chat["tool_choice"] = chat_choice
        if response_format is not None:
            chat["response_format"] = response_format
        self._echo = {
            "metadata": metadata,
            "tools": echo_tools,
            "tool_choice": echo_choice,
            "text": echo_text,
        }
        return chat

    def _previous(self) -> list[dict[str, Any]]:
        """The conversation a `previous_response_id` continues: its messages, then its output."""
        previous_id = self.payload.get("previous_response_id")
        if previous_id is None:
            return []
        stored = self.store.get(previous_id)
        if stored is None:
            raise PreviousResponseNotFoundError(
                f"Previous response with id {previous_id!r} not found (responses are kept in "
                "memory: deleted, evicted or lost on restart ones are gone)",
                param="previous_response_id",
            )
        output = stored.response.get("output") or []
        return [*stored.messages, *items_to_messages(output, "previous_response_id")]

    # The Response.

    def _base(self, status: str) -> dict[str, Any]:
        """The Response's fields, with the request's settings echoed as OpenAI echoes them."""
        self.request()
        payload = self.payload
        parallel = payload.get("parallel_tool_calls")
        # The published schema has `user` a string and `usage` an object, never null: so they
        # are left out until known (`usage` comes with the answer's end).
        user = {"user": payload["user"]} if payload.get("user") is not None else {}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "max_tool_calls": payload.get("max_tool_calls"),
            "metadata": self._echo["metadata"],
            "model": self.model,
            "output": [],
            "parallel_tool_calls": True if parallel is None else parallel,
            "previous_response_id": payload.get("previous_response_id"),
            "prompt": None,
            "prompt_cache_key": payload.get("prompt_cache_key"),
            "prompt_cache_retention": payload.get("prompt_cache_retention"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": payload.get("safety_identifier"),
            "service_tier": "default",
            "store": self._stores,
            "temperature": payload.get("temperature"),
            "text": self._echo["text"],
            "tool_choice": self._echo["tool_choice"],
            "tools": self._echo["tools"],
            "top_logprobs": 0,
            "top_p": payload.get("top_p"),
            "truncation": "disabled",
            **user,
        }

    @property
    def _stores(self) -> bool:
        return self.payload.get("store") is not False  # OpenAI stores unless told not to

    def _final(self, items: list[_Item], finish: str | None, usage: Any) -> dict[str, Any]:
        reason = _INCOMPLETE.get(finish or "")
        response = self._base("incomplete" if reason else "completed")
        response["output"] = [item.render() for item in items]
        counted = _usage(usage)
        if counted is not None:
            response["usage"] = counted
        if reason:
            response["incomplete_details"] = {"reason": reason}
        else:
            response["completed_at"] = int(time.time())
        self.response = response
        return response

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        choices = chat.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        finish = choice.get("finish_reason")
        items = _answer_items(choice.get("message") or {})
        for item in items:
            item.status = "completed"
        if finish in _INCOMPLETE:
            items[-1].status = "incomplete"  # the item the engine was writing when it stopped
        return self._final(items, finish, chat.get("usage"))

    def finished(self, answer: dict[str, Any]) -> None:
        if self._stores and answer.get("id") == self.id:
            self.store.put(answer, self._conversation)

    # The stream.

    def _sse(self, type_: str, **fields: Any) -> SSE:
        data = {"type": type_, **fields, "sequence_number": self._seq}
        self._seq += 1
        return SSE(event=type_, data=data)

    def start(self) -> list[SSE]:
        snapshot = self._base("in_progress")
        return [
            self._sse("response.created", response=snapshot),
            self._sse("response.in_progress", response=snapshot),
        ]

    def event(self, chunk: dict[str, Any]) -> list[SSE]:
        if self._failed or self.response is not None:
            return []  # nothing follows the closing event
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        events: list[SSE] = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # a Response has one answer; n>1 is never requested
            delta = choice.get("delta") or {}
            reasoning = _reasoning(delta)
            if reasoning:
                events += self._grow("reasoning", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                events += self._grow("message", content)
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
                events += self._close()
        return events

    def end(self) -> list[SSE]:
        if self._failed or self.response is not None:
            return []  # already closed: by an error, or an `end` before
        events = self._close()
        if not self._items:
            # Like a whole answer, a Response always has its message, even an empty one.
            events += self._add(_Item("message", new_id("msg"))) + self._close()
        response = self._final(self._items, self._finish, self._usage)
        return [*events, self._sse("response.completed", response=response)]

    def error_event(self, message: str, type_: str) -> list[SSE]:
        if self._failed or self.response is not None:
            return []  # the stream is closed already: nothing follows its closing event
        self._failed = True
        response = self._base("failed")
        response["output"] = [item.render() for item in self._items]
        if self._usage is not None:
            response["usage"] = _usage(self._usage)
        code = "rate_limit_exceeded" if type_ == "rate_limit_error" else "server_error"
        response["error"] = {"code": code, "message": message, "type": type_}
        self.response = response
        return [
            self._sse("error", code=code, message=message, param=None),
            self._sse("response.failed", response=response),
        ]

    def _add(self, item: _Item) -> list[SSE]:
        """Open a new output item (the one open before must be closed)."""
        item.index = len(self._items)
        self._items.append(item)
        self._open = item
        events = [
            self._sse(
                "response.output_item.added", output_index=item.index, item=item.render(opened=True)
            )
        ]
        if item.kind != "function_call":
            empty = _Item(item.kind, item.id)
            events.append(
                self._sse(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.index,
                    content_index=0,
                    part=empty.part(),
                )
            )
        return events

    def _grow(self, kind: str, text: str) -> list[SSE]:
        """Text for the open message or reasoning item, opening one if another kind is open."""
        events: list[SSE] = []
        if self._open is None or self._open.kind != kind:
            events += self._close()
            events += self._add(_Item(kind, new_id("msg" if kind == "message" else "rs")))
        item = self._open
        assert item is not None
        item.text += text
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if kind == "message":
            events.append(self._sse("response.output_text.delta", **where, delta=text, logprobs=[]))
        else:
            events.append(self._sse("response.reasoning_text.delta", **where, delta=text))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[SSE]:
        """A tool-call fragment: the first of an index opens its function_call item (id and
        name come first), the rest carry argument text."""
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        events: list[SSE] = []
        if item is None:
            events += self._close()
            item = _Item(
                "function_call",
                new_id("fc"),
                call_id=str(call.get("id") or new_id("call")),
                name=str(function.get("name") or ""),
            )
            self._calls[index] = item
            events += self._add(item)
        elif function.get("name") and not item.name:
            item.name = str(function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.text += arguments
            # Engines stream calls one after the other; a late fragment of a call already
            # closed still reaches the final Response, but gets no event after its `done`.
            if item is self._open:
                events.append(
                    self._sse(
                        "response.function_call_arguments.delta",
                        item_id=item.id,
                        output_index=item.index,
                        delta=arguments,
                    )
                )
        return events

    def _close(self) -> list[SSE]:
        """The `done` events of the open item, if any. It is incomplete when the engine stopped
        in it (max tokens, an output rail)."""
        item = self._open
        if item is None:
            return []
        self._open = None
        item.status = "incomplete" if self._finish in _INCOMPLETE else "completed"
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            # `name` is not in every SDK's model of this event, but the published spec has it.
            done = "response.function_call_arguments.done"
            events = [self._sse(done, **where, name=item.name, arguments=item.text)]
        else:
            done = (
                "response.output_text.done"
                if item.kind == "message"
                else "response.reasoning_text.done"
            )
            extra: dict[str, Any] = {"logprobs": []} if item.kind == "message" else {}
            events = [
                self._sse(done, **where, content_index=0, text=item.text, **extra),
                self._sse("response.content_part.done", **where, content_index=0, part=item.part()),
            ]
        events.append(
            self._sse("response.output_item.done", output_index=item.index, item=item.render())
        )
        return events


# GET and DELETE /v1/responses/{id}.


def retrieve(store: ResponseStore, response_id: str) -> dict[str, Any]:
    """GET /v1/responses/{id}: the stored Response."""
    stored = store.get(response_id)
    if stored is None:
        raise NotFoundError(f"Response with id {response_id!r} not found.")
    return stored.response


def delete(store: ResponseStore, response_id: str) -> dict[str, Any]:
    """DELETE /v1/responses/{id}: OpenAI's deletion answer."""
    if not store.delete(response_id):
        raise NotFoundError(f"Response with id {response_id!r} not found.")
    return {"id": response_id, "object": "response", "deleted": True}
