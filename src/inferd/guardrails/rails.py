"""Rails at run time: checks on request text before the engine, and on answers after it.

`Guardrails` is built once from the config file and shared; what one request needs (the texts,
a streamed answer's held-back tail) lives in per-request objects (`StreamFilter`).

- Input rails read the user's messages (chat) or the prompt (completions); `redact` rewrites them
  before the engine sees them, `block` refuses the request (400 `content_filter`).
- Output rails read each choice's text. Not streamed: redact in place, or replace a blocked answer
  with the configured refusal (`finish_reason: "content_filter"`), or a 400 without one.
  Streamed: text is checked as it arrives; the last `HOLD` characters wait for the next event
  (a card number or an email can be cut across events) unless the stream ends; a redacted
  span never reaches the client. A blocked stream ends at once with a notice and
  `finish_reason: "content_filter"`, and the engine connection is closed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from inferd.errors import ContentFilterError, InvalidRequestError
from inferd.guardrails import pii
from inferd.guardrails.config import GuardrailsConfig, PiiRail
from inferd.observability.metrics import Metrics

# Characters of streamed text held back until more arrives: longer than any PII kind found
# here except unusual e-mail addresses (an IBAN with spaces is at most 42).
HOLD = 64
KNOWN_RAILS = ("pii", "jailbreak", "content_safety", "topic_control")
GENERATION = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Verdict:
    rail: str
    blocked: bool
    action: str
    categories: list[str] = field(default_factory=list)
    score: float = 0.0
    ms: float = 0.0
    redacted: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rail": self.rail,
            "blocked": self.blocked,
            "action": self.action,
            "categories": self.categories,
            "score": self.score,
            "ms": round(self.ms, 3),
        }
        if self.redacted is not None:
            out["redacted"] = self.redacted
        return out


class Guardrails:
    def __init__(self, config: GuardrailsConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics

    @property
    def active(self) -> bool:
        return self.config.active

    # ------------------------------------------------------------------ one text

    def pii(self, text: str, rail: PiiRail, stage: str) -> Verdict:
        started = time.perf_counter()
        found = pii.find(text, rail.kinds, rail.region)
        seconds = time.perf_counter() - started
        kinds = sorted({f.kind for f in found})
        blocked = bool(found) and rail.action == "block"
        verdict = Verdict(
            "pii",
            blocked,
            rail.action,
            kinds,
            1.0 if found else 0.0,
            seconds * 1000,
            pii.redact(text, found) if found and rail.action == "redact" else None,
        )
        self.record("pii", stage, seconds, blocked, 0 if blocked else len(found))
        return verdict

    def record(self, rail: str, stage: str, seconds: float, blocked: bool, redacted: int) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.guardrail_checks.labels(rail, stage).inc()
        m.guardrail_seconds.labels(rail, stage).observe(seconds)
        if blocked:
            m.guardrail_blocks.labels(rail, stage).inc()
        if redacted:
            m.guardrail_redactions.labels(rail, stage).inc(redacted)

    def check(self, texts: list[str], rails: list[str]) -> list[Verdict]:
        """`/v1/guardrails/check`: each named rail over the texts, one verdict per rail."""
        unknown = [r for r in rails if r not in KNOWN_RAILS]
        if unknown or not rails:
            raise InvalidRequestError(
                f"rails must name some of {', '.join(KNOWN_RAILS)}; got {rails!r}", param="rails"
            )
        missing = [r for r in rails if r != "pii"]
        if missing:
            raise InvalidRequestError(
                f"rail {missing[0]} is not available in this service yet (available: pii)",
                param="rails",
            )
        rail = self.config.input.pii or PiiRail(action="block")
        text = "\n".join(texts)
        return [self.pii(text, rail, "check")]

    # ------------------------------------------------------------------ requests

    def guard_request(self, route: str, payload: dict[str, Any]) -> bool:
        """Input rails over a generation request; True when its text was rewritten."""
        if route not in GENERATION:
            return False
        if self.config.output.pii is not None:
            # Text the output rail does not read would carry what it redacts or blocks.
            for name in ("logprobs", "top_logprobs", "tools", "functions"):
                value = payload.get(name)
                if value is not None and value is not False:  # `logprobs: 0` asks for some too
                    raise InvalidRequestError(
                        f"{name} is not available while the pii output rail is on: it checks "
                        "the answer's text, not token logprobs or tool-call arguments",
                        param=name,
                    )
        rail = self.config.input.pii
        if rail is None:
            return False
        changed = False
        for holder, key in _request_texts(route, payload, rail.roles):
            verdict = self.pii(holder[key], rail, "input")
            if verdict.blocked:
                raise ContentFilterError(
                    f"blocked by the pii input rail: the request contains "
                    f"{', '.join(verdict.categories)}",
                    param="messages" if route.endswith("chat/completions") else "prompt",
                )
            if verdict.redacted is not None:
                holder[key] = verdict.redacted
                changed = True
        return changed

    def reads_answers(self, route: str) -> bool:
        """Whether output rails read this route's answers (else they pass untouched)."""
        return self.config.output.pii is not None and route in GENERATION

    def guard_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        """Output rails over a whole (not streamed) answer."""
        rail = self.config.output.pii
        if rail is None or route not in GENERATION:
            return answer
        for choice in answer.get("choices") or []:
            for holder, key in _answer_texts(route, choice):
                verdict = self.pii(holder[key], rail, "output")
                if verdict.blocked:
                    if self.config.refusal is None:
                        raise ContentFilterError(
                            "the answer was blocked by the pii output rail "
                            f"({', '.join(verdict.categories)})"
                        )
                    _refuse(route, choice, self.config.refusal)
                    break
                if verdict.redacted is not None:
                    holder[key] = verdict.redacted
        return answer

    def stream_filter(self, route: str) -> StreamFilter | None:
        rail = self.config.output.pii
        if rail is None or route not in GENERATION:
            return None
        return StreamFilter(self, rail, chat=route.endswith("chat/completions"))


def guardrail_texts(payload: dict[str, Any]) -> list[str]:
    """The texts a `/v1/guardrails/check` request asks about: `text`, or every message's."""
    text, messages = payload.get("text"), payload.get("messages")
    if isinstance(text, str) and messages is None:
        return [text]
    if isinstance(messages, list) and messages and text is None:
        texts: list[str] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
            content = m.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or "text" not in part:
                        continue  # images and the like: no text to check
                    if not isinstance(part["text"], str):
                        raise InvalidRequestError(
                            f"messages[{i}]: a text part's text must be a string",
                            param="messages",
                        )
                    texts.append(part["text"])
            elif content is not None:  # null: a tool-call turn, no text to check
                raise InvalidRequestError(
                    f"messages[{i}].content must be a string or a list of parts",
                    param="messages",
                )
        return texts
    raise InvalidRequestError("give either text (a string) or messages (a list)", param="text")


def _request_texts(
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


def _answer_texts(route: str, choice: Any) -> list[tuple[dict[str, Any], str]]:
    """(container, key) pairs of one answer choice's text: content and any reasoning."""
    if not isinstance(choice, dict):
        return []
    if not route.endswith("chat/completions"):
        return [(choice, "text")] if isinstance(choice.get("text"), str) else []
    message = choice.get("message")
    if not isinstance(message, dict):
        return []
    return [(message, k) for k in CHAT_FIELDS if isinstance(message.get(k), str)]


def _refuse(route: str, choice: dict[str, Any], refusal: str) -> None:
    """A blocked answer: the refusal alone, nothing of what the model said."""
    choice["finish_reason"] = "content_filter"
    choice.pop("logprobs", None)
    if route.endswith("chat/completions"):
        choice["message"] = {"role": "assistant", "content": refusal}
    else:
        choice["text"] = refusal


# Text fields of a streamed chat delta the output rail reads (reasoning models stream their
# reasoning beside the content); a completions choice has `text`.
CHAT_FIELDS = ("content", "reasoning_content", "reasoning")


class StreamFilter:
    """One streamed answer through the output rails (per request)."""

    def __init__(self, guards: Guardrails, rail: PiiRail, *, chat: bool) -> None:
        self.guards, self.rail, self.chat = guards, rail, chat
        # Per (choice, field): text not yet sent.
        self.pending: dict[tuple[int, str], str] = {}
        self.blocked = False
        self._head: dict[str, Any] = {}

    def process(self, chunk: bytes) -> tuple[bytes, bool]:
        """Complete SSE events in, what the client gets out; True once the stream must end."""
        out: list[bytes] = []
        for event in chunk.split(b"\n\n"):
            if not event.strip():
                continue
            if event.strip() == b"data: [DONE]":
                out.append(self._flush_all())
                out.append(event + b"\n\n")
                continue
            try:
                data = json.loads(event.removeprefix(b"data:"))
            except ValueError:
                out.append(event + b"\n\n")
                continue
            if not isinstance(data, dict) or not data.get("choices"):
                out.append(event + b"\n\n")  # usage, errors: not text
                continue
            self._head = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
            for choice in data["choices"]:
                final = isinstance(choice, dict) and choice.get("finish_reason") is not None
                if isinstance(choice, dict) and self._choice(choice, final):
                    out.append(self._block_event(choice.get("index", 0)))
                    return b"".join(out), True
            out.append(b"data: " + json.dumps(data).encode() + b"\n\n")
        return b"".join(out), False

    def _holder(self, choice: dict[str, Any]) -> dict[str, Any]:
        if not self.chat:
            return choice
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        return delta

    def _choice(self, choice: dict[str, Any], final: bool) -> bool:
        """Run the rail on one choice's new text (`final`: send all it holds); True if it
        blocks."""
        holder = self._holder(choice)
        index = int(choice.get("index", 0))
        for key in CHAT_FIELDS if self.chat else ("text",):
            new = holder.get(key)
            text = self.pending.get((index, key), "") + (new if isinstance(new, str) else "")
            if not text:
                continue
            started = time.perf_counter()
            findings = pii.find(text, self.rail.kinds, self.rail.region)
            seconds = time.perf_counter() - started
            if findings and self.rail.action == "block":
                self.guards.record("pii", "output", seconds, True, 0)
                self.blocked = True
                return True
            cut = len(text) if final else max(0, len(text) - HOLD)
            for f in findings:  # never cut through a finding: send it whole or not yet
                if f.start < cut < f.end:
                    cut = f.start
            done = [f for f in findings if f.end <= cut]
            self.guards.record("pii", "output", seconds, False, len(done))
            self.pending[(index, key)] = text[cut:]
            if key in holder or text[:cut]:
                holder[key] = pii.redact(text[:cut], done)
        return False

    def _flush_all(self) -> bytes:
        """What is still held when the stream ends without a finish_reason for it."""
        events = []
        for index in sorted({i for (i, _), text in self.pending.items() if text}):
            choice: dict[str, Any] = {"index": index}
            if not self._choice(choice, final=True):  # blocked: never sent, the stream ends
                events.append(
                    b"data: " + json.dumps({**self._head, "choices": [choice]}).encode() + b"\n\n"
                )
        self.pending.clear()
        return b"".join(events)

    def _block_event(self, index: int) -> bytes:
        notice = "\n[answer stopped by the pii output rail: it contained personal data]"
        choice: dict[str, Any] = {"index": index, "finish_reason": "content_filter"}
        if self.chat:
            choice["delta"] = {"content": notice}
        else:
            choice["text"] = notice
        event = {**self._head, "choices": [choice]}
        return b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
