"""Output rails over a streamed answer: one `StreamFilter` per request.

Text is checked as it arrives. The PII rail holds back the last `HOLD` characters until more
arrives (a card number or an email can be cut across events) unless the stream ends, so a
redacted span never reaches the client. The content-safety rail releases text a window at a time,
once the guard model has judged the answer so far. A blocked stream ends at once with a notice,
`finish_reason: "content_filter"` and `[DONE]`; the relay then closes the engine connection.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from inferd.guardrails import pii
from inferd.guardrails.texts import CHAT_FIELDS
from inferd.guardrails.verdict import Verdict

if TYPE_CHECKING:
    from inferd.guardrails.rails import Guardrails

log = logging.getLogger("inferd.guardrails")

# Characters of streamed text held back until more arrives: longer than any PII kind found
# here except unusual e-mail addresses (an IBAN with spaces is at most 42).
HOLD = 64
# The most held back at once: a span that keeps growing (a long run of digits read as one
# number) would otherwise be held, and re-scanned, without bound. Past this, the held span is
# redacted through and released.
MAX_HELD = 16 * HOLD
# The most of a streamed answer sent to the guard model at once (its latest part): the guard's
# context is finite, and earlier windows were judged already.
JUDGED_TAIL = 4000


class StreamFilter:
    """One streamed answer through the output rails (per request)."""

    def __init__(self, guards: Guardrails, *, chat: bool, user: str = "") -> None:
        self.guards, self.chat, self.user = guards, chat, user
        self.pii_rail = guards.inline_output.pii
        self.safety_rail = guards.inline_output.content_safety
        # Per (choice, field): text not yet past the PII rail; text past it, not yet judged by
        # the guard model; text judged (what the client has).
        self.pending: dict[tuple[int, str], str] = {}
        self.unjudged: dict[tuple[int, str], str] = {}
        self.judged: dict[tuple[int, str], str] = {}
        self.blocked_by: Verdict | None = None
        self._head: dict[str, Any] = {}

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None

    async def process(self, chunk: bytes) -> tuple[bytes, bool]:
        """Complete SSE events in, what the client gets out; True once the stream must end."""
        out: list[bytes] = []
        for event in chunk.split(b"\n\n"):
            if not event.strip():
                continue
            if event.strip() == b"data: [DONE]":
                flushed, stop = await self._flush_all()
                out.append(flushed)
                if stop:
                    return b"".join(out), True
                out.append(event + b"\n\n")
                continue
            try:
                data = json.loads(event.removeprefix(b"data:"))
            except ValueError:
                if event.lstrip().startswith(b"data:"):
                    # Text the rails cannot read does not pass them (fail closed).
                    log.warning("dropped a streamed event the output rails cannot parse")
                else:
                    out.append(event + b"\n\n")  # SSE comments and the like
                continue
            if not isinstance(data, dict) or not data.get("choices"):
                out.append(event + b"\n\n")  # usage, errors: not text
                continue
            self._head = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
            for choice in data["choices"]:
                final = isinstance(choice, dict) and choice.get("finish_reason") is not None
                if isinstance(choice, dict) and await self._choice(choice, final):
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

    async def _choice(self, choice: dict[str, Any], final: bool) -> bool:
        """Run the rails on one choice's new text (`final`: send all it holds); True if they
        block."""
        holder = self._holder(choice)
        index = int(choice.get("index", 0))
        for key in CHAT_FIELDS if self.chat else ("text",):
            new = holder.get(key)
            slot = (index, key)
            text = self.pending.get(slot, "") + (new if isinstance(new, str) else "")
            released = self._pii(slot, text, final) if self.pii_rail is not None else text
            if released is None:
                return True
            if self.safety_rail is None:
                if key in holder or released:
                    holder[key] = released
                continue
            unjudged = self.unjudged.get(slot, "") + released
            if unjudged and (final or len(unjudged) >= self.safety_rail.stream_window):
                answer = (self.judged.get(slot, "") + unjudged)[-JUDGED_TAIL:]
                verdict = await self.guards.content_safety(
                    self.user, answer, self.safety_rail, "output"
                )
                if verdict.blocked:
                    self.blocked_by = verdict
                    return True
                self.judged[slot] = self.judged.get(slot, "") + unjudged
                holder[key], self.unjudged[slot] = unjudged, ""
            else:
                self.unjudged[slot] = unjudged
                if key in holder:
                    holder[key] = ""
        return False

    def _pii(self, slot: tuple[int, str], text: str, final: bool) -> str | None:
        """The part of `text` the PII rail lets through now (redacted); None if it blocks."""
        rail = self.pii_rail
        assert rail is not None
        if not text:
            return ""
        started = time.perf_counter()
        findings = pii.find(text, rail.kinds, rail.region)
        seconds = time.perf_counter() - started
        if findings and rail.action == "block":
            self.guards.record("pii", "output", seconds, True, 0)
            kinds = sorted({f.kind for f in findings})
            self.blocked_by = Verdict("pii", True, "block", kinds)
            return None
        cut = len(text) if final else max(0, len(text) - HOLD)
        through: pii.Finding | None = None
        for f in findings:  # never cut through a finding: send it whole or not yet
            if f.start < cut < f.end:
                if len(text) - f.start > MAX_HELD:
                    # Held too long: redact what has come of it; the rest is checked as it comes.
                    through = pii.Finding(f.kind, f.start, cut)
                else:
                    cut = f.start
        done = [f for f in findings if f.end <= cut]
        if through is not None and through.end <= cut:
            done.append(through)
        self.guards.record("pii", "output", seconds, False, len(done))
        self.pending[slot] = text[cut:]
        return pii.redact(text[:cut], done)

    async def _flush_all(self) -> tuple[bytes, bool]:
        """What is still held when the stream ends without a finish_reason for it."""
        events: list[bytes] = []
        held = {i for (i, _), text in [*self.pending.items(), *self.unjudged.items()] if text}
        for index in sorted(held):
            choice: dict[str, Any] = {"index": index}
            if await self._choice(choice, final=True):  # blocked: never sent, the stream ends
                return b"".join(events) + self._block_event(index), True
            events.append(
                b"data: " + json.dumps({**self._head, "choices": [choice]}).encode() + b"\n\n"
            )
        self.pending.clear()
        self.unjudged.clear()
        return b"".join(events), False

    async def finish(self) -> bytes:
        """The engine closed the stream without `[DONE]`: what is still held, judged, or the
        blocking notice."""
        flushed, _ = await self._flush_all()
        return flushed

    def _block_event(self, index: int) -> bytes:
        verdict = self.blocked_by
        if verdict is not None and verdict.rail == "content_safety":
            cats = f": {', '.join(verdict.categories)}" if verdict.categories else ""
            notice = f"\n[answer stopped by the content_safety output rail{cats}]"
        else:
            notice = "\n[answer stopped by the pii output rail: it contained personal data]"
        choice: dict[str, Any] = {"index": index, "finish_reason": "content_filter"}
        if self.chat:
            choice["delta"] = {"content": notice}
        else:
            choice["text"] = notice
        event = {**self._head, "choices": [choice]}
        return b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
