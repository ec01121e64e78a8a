"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) as a
translation onto the engine's OpenAI chat completions.

`MessagesTranslation` has the request checked and built by `messages_request` (field by field,
refusing by name what cannot be honoured), and turns the chat answer or its chunks back into an
Anthropic `Message` or its event stream (`message_start`, `ping`, content blocks,
`message_delta`, `message_stop`). Decisions a client can see:

- The model's reasoning (`reasoning_content`/`reasoning`) becomes `thinking` blocks only when the
  client enabled thinking; otherwise it is dropped, since a client that did not ask for thinking
  reads `content` as text and tool calls. Thinking blocks carry an empty `signature` (nothing
  here can sign them); thinking blocks sent back in later turns are dropped, as Anthropic itself
  drops earlier turns' thinking from the prompt. `budget_tokens` is checked as Anthropic checks
  it but not enforced: `max_tokens` bounds reasoning and answer together.
- `stop_sequence` names the matched stop string only when the engine says which one matched
  (vLLM's `stop_reason`); llama-server's chat route does not, so there a stop sequence reads as
  `end_turn`.
- `tool_choice: {type: tool, name}` becomes `"required"` over that one tool: llama-server takes
  only string tool choices, and this forces the same call on both engines.
- `cache_control` is accepted and ignored (engines reuse cached prompt prefixes on their own);
  engine-reported cached prompt tokens are `cache_read_input_tokens`, and `input_tokens` the rest.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from inferd.server.apis.messages_request import (
    ERROR_TYPES,
    STOP_REASONS,
    chat_request,
)
from inferd.server.apis.translation import SSE, Translation

# --- the answer -------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _usage(usage: Any) -> dict[str, int]:
    """Anthropic's usage from chat's: input_tokens + cache reads = the prompt."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _matched_stop(choice: dict[str, Any], stop_sequences: list[str]) -> str | None:
    """The stop sequence the engine says it matched: vLLM's `stop_reason` (an int there is a
    stop token, not a sequence); the other names are llama-server's native ones."""
    for key in ("stop_reason", "stopping_word", "stop_word"):
        value = choice.get(key)
        if isinstance(value, str) and value in stop_sequences:
            return value
    return None


def _stop_reason(finish: str | None, matched: str | None, used_tool: bool) -> str:
    # max_tokens wins: a tool call it cut short must not run.
    if finish in STOP_REASONS:
        return STOP_REASONS[finish]
    if used_tool:
        return "tool_use"
    if matched is not None:
        return "stop_sequence"
    return "end_turn"


def _tool_input(arguments: Any) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` must be. Arguments that are not a
    JSON object (cut short by max_tokens, or malformed by the model) give `{}`."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reasoning(message: dict[str, Any]) -> str:
    # llama-server and older vLLM say reasoning_content; vLLM 0.32 says reasoning.
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx read as invalid requests)."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope, for the front to answer a failed request with."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


_ANTHROPIC_TYPES = frozenset(ERROR_TYPES.values())
# inferd's own error types (inferd.errors) where they differ from Anthropic's.
_INFERD_TYPES = {"server_error": "api_error"}


class MessagesTranslation(Translation):
    """One Messages request: its chat request, and its answer or stream back."""

    def __init__(self, payload: dict[str, Any], model: str) -> None:
        super().__init__(payload, model)
        self.id = _new_id("msg")
        # Read once, loosely: `request` is where they are checked and refused.
        stops = payload.get("stop_sequences")
        self._stops = [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []
        thinking = payload.get("thinking")
        self._show_thinking = isinstance(thinking, dict) and thinking.get("type") != "disabled"
        # Stream state: blocks so far (dicts in the answer's shape), the open one, chat's tool
        # call index -> block index, raw arguments per block, and how the engine finished.
        self._blocks: list[dict[str, Any]] = []
        self._open: int | None = None
        self._tool_blocks: dict[int, int] = {}
        self._arguments: dict[int, str] = {}
        self._finish: str | None = None
        self._matched: str | None = None
        self._usage: dict[str, Any] | None = None
        self._delta_sent = False
        self._stopped = False

    def request(self) -> dict[str, Any]:
        return chat_request(self.payload, self.model)

    # --- a whole answer ---------------------------------------------------------------------

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        choices = chat.get("choices") or [{}]
        choice = choices[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        reasoning = _reasoning(message)
        if reasoning and self._show_thinking:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": _new_id("toolu"),
                    "name": function.get("name", ""),
                    "input": _tool_input(function.get("arguments")),
                }
            )
        matched = _matched_stop(choice, self._stops)
        used_tool = any(b["type"] == "tool_use" for b in content)
        return self._message(
            content,
            _stop_reason(choice.get("finish_reason"), matched, used_tool),
            matched,
            _usage(chat.get("usage")),
        )

    def _message(
        self,
        content: list[dict[str, Any]],
        stop_reason: str | None,
        matched: str | None,
        usage: dict[str, int],
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": matched if stop_reason == "stop_sequence" else None,
            "usage": usage,
        }

    # --- a stream ---------------------------------------------------------------------------

    def start(self) -> list[SSE]:
        # Input tokens are known only from the engine's last chunk: message_start says 0 and
        # message_delta carries the count (its usage fields are cumulative, SDKs take them).
        opening = self._message([], None, None, _usage(None))
        return [
            SSE("message_start", {"type": "message_start", "message": opening}),
            SSE("ping", {"type": "ping"}),
        ]

    def event(self, chunk: dict[str, Any]) -> list[SSE]:
        out: list[SSE] = []
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            out += self._choice(choice)
        if self._finish is not None and self._usage is not None:
            out += self._close()
        return out

    def end(self) -> list[SSE]:
        return self._close()

    def error_event(self, message: str, type_: str) -> list[SSE]:
        kind = type_ if type_ in _ANTHROPIC_TYPES else _INFERD_TYPES.get(type_, "api_error")
        return [SSE("error", {"type": "error", "error": {"type": kind, "message": message}})]

    def message(self) -> dict[str, Any]:
        """The streamed answer so far as one Message (for `finished` once the stream ends)."""
        content = [dict(b) for b in self._blocks]
        for index, raw in self._arguments.items():
            content[index]["input"] = _tool_input(raw)
        used_tool = bool(self._tool_blocks)
        reason = _stop_reason(self._finish, self._matched, used_tool) if self._stopped else None
        return self._message(content, reason, self._matched, _usage(self._usage))

    def _choice(self, choice: dict[str, Any]) -> list[SSE]:
        out: list[SSE] = []
        delta = choice.get("delta") or {}
        reasoning = _reasoning(delta)
        if reasoning and self._show_thinking:
            out += self._append("thinking", reasoning)
        text = delta.get("content")
        if isinstance(text, str) and text:
            out += self._append("text", text)
        for position, call in enumerate(delta.get("tool_calls") or []):
            out += self._tool_fragment(call, position)
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
            self._matched = _matched_stop(choice, self._stops)
            # Nothing follows the finish but the usage chunk: close the block now.
            out += self._close_block()
        return out

    def _append(self, kind: str, text: str) -> list[SSE]:
        """Text or thinking: into the open block of that kind, or a new one."""
        out: list[SSE] = []
        if self._open is None or self._blocks[self._open]["type"] != kind:
            empty = {"type": "text", "text": ""}
            if kind == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
            out += self._open_block(empty)
        assert self._open is not None
        self._blocks[self._open][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        out.append(self._delta(self._open, delta))
        return out

    def _tool_fragment(self, call: dict[str, Any], position: int) -> list[SSE]:
        out: list[SSE] = []
        index = call.get("index", position)
        function = call.get("function") or {}
        block = self._tool_blocks.get(index)
        if block is None:
            tool = {"type": "tool_use", "id": _new_id("toolu"), "name": "", "input": {}}
            tool["name"] = function.get("name") or ""
            out += self._open_block(tool)
            block = self._tool_blocks[index] = len(self._blocks) - 1
            self._arguments[block] = ""
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            # A fragment for a call already closed (engines send calls one after another, so
            # this is rare) still goes to its block: SDKs accumulate by index.
            self._arguments[block] += piece
            out.append(self._delta(block, {"type": "input_json_delta", "partial_json": piece}))
        return out

    def _open_block(self, block: dict[str, Any]) -> list[SSE]:
        out = self._close_block()
        self._blocks.append(block)
        self._open = len(self._blocks) - 1
        # A copy: the block itself keeps growing as deltas arrive, the event must not.
        start = {"type": "content_block_start", "index": self._open, "content_block": dict(block)}
        out.append(SSE("content_block_start", start))
        return out

    def _close_block(self) -> list[SSE]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        out: list[SSE] = []
        if self._blocks[index]["type"] == "thinking":
            # Anthropic ends a thinking block with its signature; there is none to give.
            out.append(self._delta(index, {"type": "signature_delta", "signature": ""}))
        out.append(SSE("content_block_stop", {"type": "content_block_stop", "index": index}))
        return out

    def _delta(self, index: int, delta: dict[str, Any]) -> SSE:
        data = {"type": "content_block_delta", "index": index, "delta": delta}
        return SSE("content_block_delta", data)

    def _close(self) -> list[SSE]:
        """message_delta (stop reason, final usage) and message_stop, once."""
        out = self._close_block()
        if self._stopped:
            return out
        self._stopped = True
        usage = _usage(self._usage)
        reason = _stop_reason(self._finish, self._matched, bool(self._tool_blocks))
        delta = {
            "stop_reason": reason,
            "stop_sequence": self._matched if reason == "stop_sequence" else None,
        }
        out.append(SSE("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(SSE("message_stop", {"type": "message_stop"}))
        return out


def count_tokens_answer(count: int) -> dict[str, int]:
    """Anthropic's count_tokens answer."""
    return {"input_tokens": count}


def engine_token_count(answer: dict[str, Any]) -> int:
    """The count in an engine's tokenizer answer: vLLM's `/tokenize` says `count`, llama-server's
    `input_tokens` route says `input_tokens`."""
    for key in ("count", "input_tokens"):
        value = answer.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) else 0
