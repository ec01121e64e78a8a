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

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from inferd.errors import NotFoundError, PreviousResponseNotFoundError
from inferd.server.apis import responses_request as req
from inferd.server.apis.response_store import ResponseStore
from inferd.server.apis.translation import SSE, Translation

# Chat finish reasons that leave a Response incomplete, and the reason OpenAI gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


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
        req.check_fields(payload)
        metadata = req.metadata(payload.get("metadata"))
        chat_tools, echo_tools = req.tools(payload.get("tools"))
        names = {tool["name"] for tool in echo_tools}
        chat_choice, echo_choice = req.tool_choice(payload.get("tool_choice"), names)
        response_format, echo_text = req.text_format(payload.get("text"))
        if "input" not in payload:
            raise req.fail("input is required", "input")
        self._conversation = self._previous() + req.input_messages(payload["input"])
        if not self._conversation:
            raise req.fail("input must hold at least one message", "input")
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
        return [*stored.messages, *req.items_to_messages(output, "previous_response_id")]

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
