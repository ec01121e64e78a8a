"""One request's journey through the front: its slot, timings, token counts and outcome.

A `Call` is created once a request is admitted (it holds the engine slot), watches the answer go
by (first token, usage, finish reason, errors inside a stream), and on `finish` releases the slot,
charges the tokens to the caller's API key, records the metrics and writes the one log line. It
is per-request state: nothing here is shared between requests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from inferd.guardrails.stream import StreamFilter
from inferd.observability.metrics import Metrics
from inferd.server.admission import Recall, Slot
from inferd.server.engine_stream import EngineStream
from inferd.server.keys import KeyRecord, KeyRing

log = logging.getLogger("inferd.requests")

# Markers looked for in raw event bytes, so that plain token events are never parsed.
_USAGE = b'"usage"'
_LOGPROBS = b'"logprobs":{'
# Fields of a stream event that every event of one answer shares.
_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint")
_ERROR = b'{"error"'
# An event that carries nothing: llama-server opens a stream of several prompts with one, which
# OpenAI's clients cannot parse (the SDK fails on a chunk that is not an object).
_NULL_EVENT = b"data: null"
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"]*)"')


class Call:
    """One request's journey through the front: timings and counts for metrics and the log."""

    def __init__(
        self,
        model: str,
        metrics: Metrics,
        path: str,
        rid: str,
        *,
        slot: Slot | None = None,
        key: KeyRecord | None = None,
        keys: KeyRing | None = None,
        counted: bool | None = None,
    ) -> None:
        self.model = model
        # Every forwarded request holds a slot (admission bounds what reaches an engine);
        # generation and retrieval requests also feed the request and token metrics.
        self.slot = slot
        self.counted = slot is not None if counted is None else counted
        self.key, self.keys = key, keys
        self.metrics = metrics
        self.path = path
        self.rid = rid
        # The engine gets an id of its own: clients may reuse theirs, engines need unique ones.
        self.engine_rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = "unknown"
        self.strip_usage = False
        # The engine's reshaping of streamed events into inferd's API, if it needs one.
        self.adapt_event: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # The front route's reshaping of a whole answer (NIM's ranking format), if any; applied
        # by the proxy to the answer `read_answer` parsed.
        self.reshape_answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # Output rails over a streamed answer (per request), when a guardrails file has some.
        self.stream_filter: StreamFilter | None = None
        self.engine_error = False  # the engine reported an error inside a 200 stream
        self.upstream: aiohttp.ClientResponse | EngineStream | None = None
        self.abort_reason: str | None = None
        # Set when a change of turn takes the request back before its engine answered
        # (`Slot.recallable`); None where nothing can.
        self.recall: Recall | None = None
        # A stream's first bytes, read while a change of turn could still take it back
        # (`proxy._first_unless_recalled`); the relay sends them first.
        self.head = b""
        self._open = True

    def withdraw(self) -> None:
        """Taken back before its engine answered: the slot goes, nothing is recorded (the
        request is sent again, and recorded once, where it is answered)."""
        if self._open:
            self._open = False
            if self.slot is not None:
                self.slot.release()

    def abort(self, reason: str) -> None:
        """Cut the engine connection (drain deadline): the relay then ends the stream."""
        self.abort_reason = reason
        if self.upstream is not None:
            self.upstream.close()

    def read_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def observe_events(self, chunk: bytes) -> bytes:
        """Look at complete SSE events; returns what goes on to the client."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        reasons = _FINISH.findall(chunk)
        if reasons:
            self.finish_reason = reasons[-1].decode("ascii", "replace")
        if self.adapt_event is not None and _LOGPROBS in chunk:
            chunk = self._adapt_events(chunk)
        if _NULL_EVENT in chunk:
            chunk = b"".join(e + b"\n\n" for e in chunk.split(b"\n\n") if e and e != _NULL_EVENT)
        if _USAGE not in chunk and _ERROR not in chunk:
            return chunk  # the common case: plain token events, forwarded untouched
        kept: list[bytes] = []
        for event in chunk.split(b"\n\n"):
            if not event:
                continue
            if _USAGE in event or _ERROR in event:
                try:
                    data = json.loads(event.removeprefix(b"data:"))
                except ValueError:
                    data = None  # not ours to judge; the client gets the event as it was
                if isinstance(data, dict):
                    self.engine_error |= "error" in data
                    usage = data.get("usage")
                    if isinstance(usage, dict):
                        self.read_usage(usage)
                        if data.get("choices"):
                            # Usage riding on the last token event (llama-server's
                            # /v1/completions): split off into its own event with no choices,
                            # as OpenAI (and vLLM) send it, so every engine streams alike.
                            kept.extend(self._split_usage(data, usage))
                            continue
                        if self.strip_usage and data.get("choices") == []:
                            continue  # the usage chunk inferd asked for on the client's behalf
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def adapt_body(self, body: bytes) -> bytes:
        """A whole (non-streamed) answer through the engine's event reshaping, if it has one:
        an answer's choices take the same shape as a streamed event's."""
        if self.adapt_event is None or _LOGPROBS not in body:
            return body
        with contextlib.suppress(ValueError):
            return json.dumps(self.adapt_event(json.loads(body))).encode()
        return body

    def _adapt_events(self, chunk: bytes) -> bytes:
        return b"\n\n".join(
            b"data: " + self.adapt_body(event.removeprefix(b"data: "))
            if event.startswith(b"data: {")
            else event
            for event in chunk.split(b"\n\n")
        )

    def _split_usage(self, data: dict[str, Any], usage: dict[str, Any]) -> list[bytes]:
        del data["usage"]
        events = [b"data: " + json.dumps(data).encode() + b"\n\n"]
        if not self.strip_usage:
            head = {k: data[k] for k in _ENVELOPE if k in data}
            only = {**head, "choices": [], "usage": usage}
            events.append(b"data: " + json.dumps(only).encode() + b"\n\n")
        return events

    def read_answer(self, body: bytes) -> dict[str, Any] | None:
        """Usage and finish reason from a whole answer; the answer, parsed, if it is an object."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        self.read_usage(data.get("usage") or {})
        choices = data.get("choices") or [{}]
        self.finish_reason = str(choices[-1].get("finish_reason") or "unknown")
        return data

    def finish(self, status: int = 200) -> None:
        """Record the outcome once (success or failure) and release the running slot."""
        if not self._open:
            return
        self._open = False
        if self.engine_error and status < 400:
            status = 500
        now = time.perf_counter()
        if self.slot is not None:
            self.slot.release()
        if self.key is not None and self.keys is not None:
            self.keys.record_tokens(self.key, self.prompt_tokens + self.completion_tokens)
        if self.counted:
            self._record(status, now)
        log.info(
            "%s model=%s status=%d prompt_tokens=%d completion_tokens=%d ms=%.0f",
            self.path,
            self.model,
            status,
            self.prompt_tokens,
            self.completion_tokens,
            (now - self.started) * 1000,
            extra={
                "engine_request_id": self.engine_rid,
                "api_key": self.key.name if self.key else None,
            },
        )

    def _record(self, status: int, now: float) -> None:
        m, model = self.metrics, self.model
        if status >= 400:
            m.request_failure.labels(model, str(status)).inc()
            return
        m.request_success.labels(model, self.finish_reason).inc()
        m.e2e.labels(model).observe(now - self.started)
        if self.prompt_tokens or self.completion_tokens:
            m.prompt_tokens.labels(model).inc(self.prompt_tokens)
            m.generation_tokens.labels(model).inc(self.completion_tokens)
            m.request_prompt_tokens.labels(model).observe(self.prompt_tokens)
            m.request_generation_tokens.labels(model).observe(self.completion_tokens)
        if self.first_token_at is not None:
            m.ttft.labels(model).observe(self.first_token_at - self.started)
            if self.completion_tokens > 1:
                per_token = (now - self.first_token_at) / (self.completion_tokens - 1)
                m.tpot.labels(model).observe(per_token)
