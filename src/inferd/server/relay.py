"""Streamed answers: the engine's SSE events relayed to the client as they arrive.

A `Relay` is one stream's per-request state on its way from the engine's bytes to the
client's: whole events cut out of the engine's chunks (`events`; a finished event is never
held), observed by the `Call` (usage, finish reason, errors: only events carrying them are
parsed; the common token event passes untouched) and put in OpenAI's published shape (`conform`);
after the output rails, in a translated route's (Responses, Messages) own events
(`client_bytes`, by its `Translation`).

`RelayResponse` sends them. A stream with output rails is relayed by a task reading the
`EngineStream` (the rails are asynchronous: a guard model is asked over HTTP). One without is
relayed from the engine connection's own callback (`EngineStream.deliver`): each token's bytes
go through the `Relay` and into the ASGI `send` before the callback returns, with no task woken
between the two sockets, which is most of what the front costs a token on a CPU whose cores the
engine holds (benchmarks/RESULTS.md, "The token path out of aiohttp and out of a task"). If the
engine connection breaks, the stream ends with an error event (for chat: OpenAI's error object
and `[DONE]`). The response always records how the stream ended and closes the engine's
connection, whether the client stayed, hung up, or was gone before the first byte.
"""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import aiohttp
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from inferd.server.apis import conform
from inferd.server.apis.translation import SSE, Translation
from inferd.server.call import Call
from inferd.server.engine_stream import EngineStream
from inferd.server.errors import envelope
from inferd.server.supervisor import Supervisor

DONE = b"data: [DONE]"


class AnswerTooLargeError(aiohttp.ClientPayloadError):
    """An engine answer, or one event of its stream, beyond the front's bound."""


async def read_bounded(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A whole answer, at most `limit` bytes of it: an engine told to write megabytes (every
    token's probabilities, say) cannot make the front hold them all."""
    got, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise AnswerTooLargeError(f"the engine's answer exceeds {limit} bytes")
        got.append(chunk)
    return b"".join(got)


def _encoded(events: list[SSE]) -> bytes:
    return b"".join(e.encode() for e in events)


class Relay:
    """One stream's events, engine to client (per request). `translation`: a translated
    route's; `max_event_bytes`: how long one engine event may be."""

    def __init__(self, call: Call, translation: Translation | None, max_event_bytes: int) -> None:
        self.call = call
        self.translation = translation
        self.max_event_bytes = max_event_bytes
        self.pending = b""  # the start of an event whose end has not come
        self.done = False  # `[DONE]` went to the client: the answer is complete
        self.closed = False  # the translated stream's closing (or error) events went

    def events(self, chunk: bytes) -> bytes:
        """The whole events `chunk` completes, observed and in OpenAI's shape (b"" if none)."""
        if not self.pending and chunk.endswith(b"\n\n"):
            complete = chunk  # the common read: whole events, nothing held back
        else:
            self.pending += chunk
            cut = self.pending.rfind(b"\n\n")
            if cut < 0:
                if len(self.pending) > self.max_event_bytes:
                    raise AnswerTooLargeError(
                        f"an engine event exceeds {self.max_event_bytes} bytes"
                    )
                return b""
            complete, self.pending = self.pending[: cut + 2], self.pending[cut + 2 :]
        # OpenAI's published shape (conform), after the engine's own reshaping and the usage
        # split (observe_events), before the rails read it.
        return conform.stream_events(self.call.path, self.call.observe_events(complete))

    def last(self) -> bytes:
        """A last event the engine sent without its blank line, completed (b"" if none)."""
        pending, self.pending = self.pending, b""
        return pending.strip() + b"\n\n" if pending.strip() else b""

    def opening(self) -> bytes:
        return _encoded(self.translation.start()) if self.translation is not None else b""

    def closing(self) -> bytes:
        """A translated stream's closing events, if an end has not sent them (the chat stream
        ended without `[DONE]`: an output rail stopped it)."""
        if self.translation is None or self.closed:
            return b""
        self.closed = True
        return _encoded(self.translation.end())

    def client_bytes(self, batch: bytes) -> bytes:
        """Chat events (after the rails) as the client gets them: as they are, or in the
        translated API's events. The translated stream ends once: with the API's closing
        events after `[DONE]`, or with its error event; what follows is dropped."""
        if DONE in batch:
            self.done = True
        if self.translation is None or not batch:
            return batch
        out: list[SSE] = []
        for raw in batch.split(b"\n\n"):
            data = raw.strip().removeprefix(b"data:").strip()
            if not data or self.closed:
                continue
            if data == b"[DONE]":
                self.closed = True
                out += self.translation.end()
                answer = self.translation.streamed()
                if answer is not None:
                    self.translation.finished(answer)
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
                out += self.translation.error_event(message, "api_error")
                self.closed = True
                continue
            out += self.translation.event(chunk)
        return _encoded(out)


@types.coroutine
def _resumed(coro: Any, waited: Any) -> Generator[Any, None, Any]:
    """The rest of a coroutine that was stepped once outside a task and waits on `waited`:
    awaited by a task, it resumes where it stopped (`await coro` cannot: the coroutine is
    suspended in an await already). Python 3.12's eager tasks do this; inferd runs on 3.11."""
    while True:
        try:
            yield waited
        except BaseException as exc:  # a cancellation, passed on as a task would
            try:
                waited = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waited = coro.send(None)
            except StopIteration as stop:
                return stop.value


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RelayResponse(Response):
    """The stream's response: relays `stream` through `relay` and records how it ended with
    `end(call, status)` (200 once the answer is complete, 499 if the client left before, 502
    or 503 if the engine's stream failed or the service cut it)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        stream: EngineStream,
        relay: Relay,
        supervisor: Supervisor,
        end: Callable[[Call, int], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.stream = stream
        self.relay = relay
        self.call = relay.call
        self.supervisor = supervisor
        self.end = end
        self.failed: int | None = None  # the status of a failed stream
        self._send: Send | None = None
        self._sending: asyncio.Future[None] | None = None  # a send that had to wait

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            work = asyncio.ensure_future(self._relay())
            # A client that hangs up ends the relay (uvicorn's sends then go nowhere).
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this response is cancelled
                gone.cancel()
                work.cancel()  # a no-op once it is done
                await asyncio.wait((work,))
            if work.cancelled() or isinstance(work.exception(), OSError):
                return  # the client is gone (a server of ASGI spec 2.4 says so from send)
            work.result()  # the relay's own failure, if any, is the server's error
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.stream.close()
            if self._sending is not None:
                self._sending.cancel()
            self.end(self.call, self.status)

    @property
    def status(self) -> int:
        if self.failed is not None:
            return self.failed
        return 200 if self.relay.done else 499

    async def _out(self, body: bytes) -> None:
        if body:
            assert self._send is not None
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def _relay(self) -> None:
        relay, call = self.relay, self.call
        try:
            await self._out(relay.opening())
            head, call.head = call.head, b""  # what the proxy read already (`Call.head`)
            if call.stream_filter is None:
                await self._out(relay.client_bytes(relay.events(head)) if head else b"")
                await self._by_callback()
            else:
                await self._through_rails(head)
            relay.done = True
        except AnswerTooLargeError as exc:
            self.failed = 502
            await self._error(envelope(str(exc), "server_error", "answer_too_large"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            if call.abort_reason:
                self.failed = 503
                await self._error(envelope(call.abort_reason, "server_error", "shutting_down"))
            else:
                reason = f"the engine stopped mid-stream: {exc}"
                self.supervisor.report_failure(reason)
                self.failed = 502
                await self._error(envelope(reason, "server_error", "engine_unavailable"))

    async def _error(self, err: dict[str, Any]) -> None:
        chat = b"data: " + json.dumps(err).encode() + b"\n\n" + DONE + b"\n\n"
        await self._out(self.relay.client_bytes(chat))

    # ------------------------------------------------------------------ no rails: callbacks

    async def _by_callback(self) -> None:
        ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        def on_end(exc: BaseException | None) -> None:
            if not ended.done():  # not after this task was cancelled
                ended.set_result(exc)

        self.stream.deliver(self._pass_on, on_end)
        exc = await ended
        if exc is not None:
            raise exc
        relay = self.relay
        await self._out(relay.client_bytes(relay.last()) + relay.closing())

    def _pass_on(self, data: bytes) -> bool:
        """The stream's sink, called from the engine connection's callback: False holds the
        stream while a send waits for the client."""
        out = self.relay.client_bytes(self.relay.events(data))
        return self._send_now(out) if out else True

    def _send_now(self, body: bytes) -> bool:
        """Send `body` before returning, if the send does not wait. An ASGI send is a
        coroutine; uvicorn's (and each middleware's around it) finishes without waiting unless
        the client's socket is full, so it is stepped here once. If it waits, the rest of it
        runs as a task, and the stream is held until it is done (so nothing overtakes it)."""
        assert self._send is not None
        sending = self._send({"type": "http.response.body", "body": body, "more_body": True})
        if isinstance(sending, Coroutine):  # an `async def` send, as every ASGI server's
            try:
                waited = sending.send(None)
            except StopIteration:
                return True
            sending = _resumed(sending, waited)
        self._sending = asyncio.ensure_future(sending)
        self._sending.add_done_callback(self._sent)
        return False

    def _sent(self, sending: asyncio.Future[None]) -> None:
        self._sending = None
        if sending.cancelled():
            return
        exc = sending.exception()
        if exc is not None:
            self.stream.fail(exc)
        else:
            self.stream.resume()

    # ------------------------------------------------------------------ rails: a task

    async def _through_rails(self, head: bytes) -> None:
        rails, relay = self.call.stream_filter, self.relay
        assert rails is not None
        if head and await self._railed(relay.events(head)):
            return
        async for chunk in self.stream.chunks():
            if await self._railed(relay.events(chunk)):
                return
        last = relay.last()
        if last and await self._railed(last):
            return
        if not rails.blocked:
            # Ended without [DONE]: what the rails still hold is judged and sent now.
            tail = await rails.finish()
            if rails.blocked:
                self.call.finish_reason = "content_filter"
            await self._out(relay.client_bytes(tail))
        await self._out(relay.closing())

    async def _railed(self, events: bytes) -> bool:
        """`events` through the rails and on to the client; True if the rails ended it."""
        if not events:
            return False
        rails, relay = self.call.stream_filter, self.relay
        assert rails is not None
        out, stop = await rails.process(events)
        if stop:
            self.call.finish_reason = "content_filter"
        await self._out(relay.client_bytes(out) + (relay.closing() if stop else b""))
        return stop
