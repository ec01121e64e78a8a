"""Streamed answers: the engine's SSE events relayed to the client as they arrive.

Complete events are passed on as soon as they arrive; a finished event is never held. The common
token event is forwarded without parsing (`Call.observe_events` looks only at events carrying
usage, a finish reason or an error). With output rails, each batch goes through the request's
`StreamFilter`, which may hold text back or end the stream. A translated route (Responses,
Messages) gets the same chat events, after the rails, turned into its own events by its
`Translation`. If the engine connection breaks, the stream ends with an error event (for chat:
OpenAI's error object and `[DONE]`). `RelayResponse` releases the engine connection and the `Call`
even when the client hangs up before the first byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from inferd.server.apis import conform
from inferd.server.apis.translation import Translation
from inferd.server.call import Call
from inferd.server.errors import envelope
from inferd.server.supervisor import Supervisor

DONE = b"data: [DONE]"


class RelayResponse(StreamingResponse):
    """A streaming response that always releases the engine call, even if never iterated.

    When a client disconnects before the first byte, Starlette cancels the response without ever
    starting the body generator, so the generator's own clean-up would not run.
    """

    def __init__(
        self, content: AsyncIterator[bytes], *, on_close: Callable[[], object], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class AnswerTooLargeError(aiohttp.ClientPayloadError):
    """An engine answer, or one event of its stream, beyond the front's bound."""


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole answer, at most `limit` bytes of it: an engine told to write megabytes (every
    token's probabilities, say) cannot make the front hold them all."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLargeError(f"the engine's answer exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _chunks(resp: aiohttp.ClientResponse, call: Call) -> AsyncIterator[bytes]:
    """The stream's bytes: what the proxy read of it already (`Call.head`), then the rest."""
    head, call.head = call.head, b""
    if head:
        yield head
    async for chunk in resp.content.iter_any():
        yield chunk


async def chat_events(
    resp: aiohttp.ClientResponse,
    call: Call,
    supervisor: Supervisor,
    end: Callable[[Call, int], None],
    max_event_bytes: int = 64 * 2**20,
) -> AsyncIterator[bytes]:
    """The engine's events, as OpenAI's chat/completions stream them, through the output rails;
    `end(call, status)` records how the stream ended; an event may be `max_event_bytes` long."""
    pending = b""
    status = 499  # if the generator is closed early, the client went away
    try:
        async for chunk in _chunks(resp, call):
            if not pending and chunk.endswith(b"\n\n"):
                complete = chunk  # the common read: whole events, nothing held back
            else:
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    if len(pending) > max_event_bytes:
                        raise AnswerTooLargeError(
                            f"an engine event exceeds {max_event_bytes} bytes"
                        )
                    continue
                complete, pending = pending[: cut + 2], pending[cut + 2 :]
            # OpenAI's published shape (conform), after the engine's own reshaping and the
            # usage split (observe_events), before the rails read it.
            out = conform.stream_events(call.path, call.observe_events(complete))
            stop = False
            if call.stream_filter is not None:
                out, stop = await call.stream_filter.process(out)
                if stop:
                    call.finish_reason = "content_filter"
            if DONE in out:
                # The answer is complete: a client that hangs up now has what it asked for.
                status = 200
            if out:
                yield out
            if stop:
                return  # an output rail ended the stream; `finally` closes the engine's
        if pending.strip():
            if call.stream_filter is not None:  # a last event without its blank line
                pending, stop = await call.stream_filter.process(pending + b"\n\n")
                if stop:
                    call.finish_reason = "content_filter"
            yield pending
        if call.stream_filter is not None and not call.stream_filter.blocked:
            # Ended without [DONE]: what the rails still hold is judged and sent now.
            tail = await call.stream_filter.finish()
            if call.stream_filter.blocked:
                call.finish_reason = "content_filter"
            if tail:
                yield tail
        status = 200
    except AnswerTooLargeError as exc:
        status, err = 502, envelope(str(exc), "server_error", "answer_too_large")
        yield b"data: " + json.dumps(err).encode() + b"\n\n" + DONE + b"\n\n"
    except (TimeoutError, aiohttp.ClientError) as exc:
        if call.abort_reason:
            status, err = 503, envelope(call.abort_reason, "server_error", "shutting_down")
        else:
            reason = f"the engine stopped mid-stream: {exc}"
            supervisor.report_failure(reason)
            status, err = 502, envelope(reason, "server_error", "engine_unavailable")
        yield b"data: " + json.dumps(err).encode() + b"\n\n" + DONE + b"\n\n"
    finally:
        resp.close()
        end(call, status)


async def translated_events(
    chat: AsyncIterator[bytes], translation: Translation
) -> AsyncIterator[bytes]:
    """A chat stream (already through the rails) in a translated API's events. The stream
    ends once: with the API's closing events after `[DONE]`, or with its error event."""
    yield b"".join(e.encode() for e in translation.start())
    ended = False
    async for batch in chat:
        if ended:
            continue  # drain what follows an end (the `[DONE]` after an error event)
        out: list[bytes] = []
        for raw in batch.split(b"\n\n"):
            data = raw.strip().removeprefix(b"data:").strip()
            if not data or ended:
                continue
            if data == b"[DONE]":
                ended = True
                out += [e.encode() for e in translation.end()]
                answer = translation.streamed()
                if answer is not None:
                    translation.finished(answer)
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue  # not an event of the chat stream (an SSE comment)
            if not isinstance(chunk, dict):
                continue
            error = chunk.get("error")
            if isinstance(error, dict):
                message = str(error.get("message") or "the engine failed")
                out += [e.encode() for e in translation.error_event(message, "api_error")]
                ended = True
                continue
            out += [e.encode() for e in translation.event(chunk)]
        if out:
            yield b"".join(out)
    if not ended:
        # The chat stream ended without [DONE] (an output rail stopped it): close the answer.
        yield b"".join(e.encode() for e in translation.end())
