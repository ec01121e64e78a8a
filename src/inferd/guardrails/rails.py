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
        rail = self.config.input.pii
        if rail is None or route not in GENERATION:
            return False
        changed = False
        for holder, key in _request_texts(route, payload):
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

    def guard_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        """Output rails over a whole (not streamed) answer."""
        rail = self.config.output.pii
        if rail is None or route not in GENERATION:
            return answer
        for choice in answer.get("choices") or []:
            holder, key = _answer_text(route, choice)
            if holder is None:
                continue
            verdict = self.pii(holder[key], rail, "output")
            if verdict.blocked:
                if self.config.refusal is None:
                    raise ContentFilterError(
                        "the answer was blocked by the pii output rail "
                        f"({', '.join(verdict.categories)})"
                    )
                holder[key] = self.config.refusal
                choice["finish_reason"] = "content_filter"
            elif verdict.redacted is not None:
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
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content if isinstance(p, dict) and "text" in p]
            else:
                raise InvalidRequestError("each message needs a text content", param="messages")
        return texts
    raise InvalidRequestError("give either text (a string) or messages (a list)", param="text")


def _request_texts(route: str, payload: dict[str, Any]) -> list[tuple[Any, Any]]:
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
        if not isinstance(message, dict) or message.get("role") != "user":
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


def _answer_text(route: str, choice: Any) -> tuple[Any, str]:
    if not isinstance(choice, dict):
        return None, ""
    if route.endswith("chat/completions"):
        message = choice.get("message") or choice.get("delta")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message, "content"
        return None, ""
    return (choice, "text") if isinstance(choice.get("text"), str) else (None, "")


class StreamFilter:
    """One streamed answer through the output rails (per request)."""

    def __init__(self, guards: Guardrails, rail: PiiRail, *, chat: bool) -> None:
        self.guards, self.rail, self.chat = guards, rail, chat
        self.pending: dict[int, str] = {}  # per choice: text not yet sent
        self.blocked = False
        self._head: dict[str, Any] = {}

    def _text(self, choice: dict[str, Any]) -> tuple[Any, str]:
        if self.chat:
            delta = choice.get("delta")
            return (delta, "content") if isinstance(delta, dict) else (None, "")
        return choice, "text"

    def process(self, chunk: bytes) -> tuple[bytes, bool]:
        """Complete SSE events in, what the client gets out; True once the stream must end."""
        out: list[bytes] = []
        for event in chunk.split(b"\n\n"):
            if not event:
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
                if self._choice(choice):
                    out.append(self._block_event(choice.get("index", 0)))
                    return b"".join(out), True
            out.append(b"data: " + json.dumps(data).encode() + b"\n\n")
        return b"".join(out), False

    def _choice(self, choice: dict[str, Any]) -> bool:
        """Run the rail on one choice's new text; True if it blocks."""
        holder, key = self._text(choice)
        index = int(choice.get("index", 0))
        new = holder.get(key) if holder is not None else None
        text = self.pending.get(index, "") + (new if isinstance(new, str) else "")
        final = choice.get("finish_reason") is not None
        started = time.perf_counter()
        findings = pii.find(text, self.rail.kinds, self.rail.region) if text else []
        if findings and self.rail.action == "block":
            self.guards.record("pii", "output", time.perf_counter() - started, True, 0)
            self.blocked = True
            return True
        cut = len(text) if final else max(0, len(text) - HOLD)
        for f in findings:  # never cut through a finding: send it whole or not yet
            if f.start < cut < f.end:
                cut = f.start
        done = [f for f in findings if f.end <= cut]
        send = pii.redact(text[:cut], done)
        if text:
            self.guards.record("pii", "output", time.perf_counter() - started, False, len(done))
        self.pending[index] = text[cut:]
        if holder is not None:
            holder[key] = send
        elif send:
            choice["delta" if self.chat else "text"] = {"content": send} if self.chat else send
        return False

    def _flush_all(self) -> bytes:
        events = []
        for index, text in self.pending.items():
            if not text:
                continue
            started = time.perf_counter()
            found = pii.find(text, self.rail.kinds, self.rail.region)
            self.guards.record("pii", "output", time.perf_counter() - started, False, len(found))
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["delta"] = {"content": pii.redact(text, found)}
            else:
                choice["text"] = pii.redact(text, found)
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
