"""Where guardrails find text: in requests (by role), answers (content and reasoning), and the
`/v1/guardrails/check` route's `text` or `messages`. Functions returning (container, key) pairs
let a rail rewrite the text in place (redaction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferd.errors import InvalidRequestError

# Text fields of a streamed chat delta the output rail reads (reasoning models stream their
# reasoning beside the content); a completions choice has `text`.
CHAT_FIELDS = ("content", "reasoning_content", "reasoning")


@dataclass
class Texts:
    """What a /v1/guardrails/check request asks about, as each rail reads it."""

    all: list[str]  # every text (PII, jailbreak)
    user: list[str]  # the user's messages (content safety)
    response: str | None  # the last assistant message after the last user one, if any
    conversation: list[dict[str, str]]  # user and assistant turns (topic control)


def guardrail_texts(payload: dict[str, Any]) -> Texts:
    """The texts a `/v1/guardrails/check` request asks about: `text`, or the messages'."""
    text, messages = payload.get("text"), payload.get("messages")
    if isinstance(text, str) and messages is None:
        return Texts([text], [text], None, [{"role": "user", "content": text}])
    if isinstance(messages, list) and messages and text is None:
        texts = Texts([], [], None, [])
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
            role = m.get("role")
            if not isinstance(role, str):
                raise InvalidRequestError(f"messages[{i}].role must be a string", param="messages")
            content = _message_text(m.get("content"), i)
            if content is None:
                continue
            texts.all.append(content)
            if role == "user":
                texts.user.append(content)
                texts.response = None
            elif role == "assistant":
                texts.response = content if texts.user else None
            if role in ("user", "assistant"):
                texts.conversation.append({"role": role, "content": content})
        if not texts.user and texts.all:
            texts.user = list(texts.all)  # no user turn: judge what was given
        texts.conversation = _ending_with_user(texts.conversation) or [
            {"role": "user", "content": "\n\n".join(texts.user)}
        ]
        return texts
    if isinstance(messages, list) and not messages and text is None:
        raise InvalidRequestError("messages is empty", param="messages")
    raise InvalidRequestError("give either text (a string) or messages (a list)", param="text")


def _message_text(content: object, i: int) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or "text" not in part:
                continue  # images and the like: no text to check
            if not isinstance(part["text"], str):
                raise InvalidRequestError(
                    f"messages[{i}]: a text part's text must be a string", param="messages"
                )
            parts.append(part["text"])
        return "\n".join(parts)
    if content is None:  # a tool-call turn: no text to check
        return None
    raise InvalidRequestError(
        f"messages[{i}].content must be a string or a list of parts", param="messages"
    )


def request_texts(
    route: str, payload: dict[str, Any], roles: tuple[str, ...] = ("user",)
) -> list[tuple[Any, Any]]:
    """(container, key) pairs of the request's user text, to read and rewrite in place."""
    if not route.endswith("chat/completions"):
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return [(payload, "prompt")]
        if isinstance(prompt, list):
            return [(prompt, i) for i, p in enumerate(prompt) if isinstance(p, str)]
        return []
    found: list[tuple[Any, Any]] = []
    for message in payload.get("messages") or []:
        if not isinstance(message, dict) or message.get("role") not in roles:
            continue
        content = message.get("content")
        if isinstance(content, str):
            found.append((message, "content"))
        elif isinstance(content, list):
            found += [
                (part, "text")
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
    return found


def user_text(route: str, payload: dict[str, Any], roles: tuple[str, ...]) -> str:
    return "\n\n".join(h[k] for h, k in request_texts(route, payload, roles))


def conversation(
    route: str, payload: dict[str, Any], roles: tuple[str, ...]
) -> list[dict[str, str]]:
    """The request's turns a topic judge reads: the roles' messages and the assistant's replies
    (the request's own system prompt is replaced by the operator's topics)."""
    if not route.endswith("chat/completions"):
        return [{"role": "user", "content": user_text(route, payload, roles)}]
    turns: list[dict[str, str]] = []
    for i, message in enumerate(payload.get("messages") or []):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in roles or role == "assistant":
            text = _message_text(message.get("content"), i)
            if text:
                turns.append({"role": "assistant" if role == "assistant" else "user",
                              "content": text})  # fmt: skip
    return _ending_with_user(turns)


def _ending_with_user(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The judge rates the user's last turn: replies after it are not part of the question (and
    engines read a trailing assistant turn as the start of their own answer)."""
    while turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    return turns


def answer_texts(route: str, choice: Any) -> list[tuple[dict[str, Any], str]]:
    """(container, key) pairs of one answer choice's text: content and any reasoning."""
    if not isinstance(choice, dict):
        return []
    if not route.endswith("chat/completions"):
        return [(choice, "text")] if isinstance(choice.get("text"), str) else []
    message = choice.get("message")
    if not isinstance(message, dict):
        return []
    return [(message, k) for k in CHAT_FIELDS if isinstance(message.get(k), str)]
