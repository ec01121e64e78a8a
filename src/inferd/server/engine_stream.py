"""A streamed engine answer on a connection of its own, read without waking a task per chunk.

Why not aiohttp here, which sends every other engine request: on a small CPU llama.cpp's threads
hold every core while they decode, so each microsecond the front spends relaying a token is
taken from the engine (issue 18 bounds the front at 3% of output rate). aiohttp's reading of a
chunked stream (its protocol, read timer, `StreamReader` and a task woken for every chunk) was
about 40 of the front's ~215 us of CPU a token on a 2-core Zen 5 (benchmarks/RESULTS.md, "The
token path out of aiohttp and out of a task"). An `EngineStream` is an asyncio protocol over the
engine's socket whose answer is parsed by httptools (the C HTTP parser uvicorn already brings)
and whose body chunks either wait in a buffer for a reader (`readany`: a recall's first bytes,
an error answer, a stream through asynchronous output rails) or go to a sink called from the
connection's own callback (`deliver`: `server.relay`, which passes a token on to the client
before the callback returns).

Each stream has a connection of its own, closed when it ends: nothing is pooled, so nothing
stale is reused and a failure to connect is the engine's. (llama-server closes every stream's
connection anyway: its chunk provider returns false after the last chunk, which cpp-httplib
takes for a cancel; pooled, the dead connection was picked by the next request before its close
was seen, and retried.) Failures are raised as aiohttp's exception types, the ones
every caller of the engine already handles: `ClientConnectionError` (cannot connect, or the
connection broke: `ServerDisconnectedError`), `ClientPayloadError` (not HTTP/1.1 as expected)
and `TimeoutError` (the engine silent for the front's read timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import aiohttp
import httptools

CONNECT_TIMEOUT_S = 5.0
# Bytes read ahead of a reader before the engine's connection stops being read (its socket
# buffers then hold the engine back, as a client's would).
HIGH_WATER = 256 * 1024

# The sink: given the next body bytes; False holds the stream (nothing more is passed on, and
# the engine's connection is not read) until `EngineStream.resume`.
Sink = Callable[[bytes], bool]
# Called once, after the last bytes went to the sink: None at a complete answer, else the error.
OnEnd = Callable[[BaseException | None], None]


def request_bytes(path: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 POST of `body` to `path`, its connection closed after the answer. Header
    values come from inferd itself (request ids are checked printable ASCII at the door); a line
    break in one would be a bug that could split the request, so it is refused here."""
    lines = [f"POST {path} HTTP/1.1", "Host: engine", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    if any(c in line for line in lines for c in "\r\n\0"):
        raise ValueError("a line break or NUL in an engine request's head")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


class EngineStream(asyncio.Protocol):
    """One streamed answer. Open with `EngineStream.open`; then `status`, and the body through
    `readany`/`chunks` or `deliver`; `close` at any time (idempotent) ends it and its
    connection."""

    def __init__(self, request: bytes, read_timeout_s: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._read_timeout_s = read_timeout_s
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._head: asyncio.Future[None] = self._loop.create_future()
        self.status = 0
        self._chunks: list[bytes] = []  # body bytes not yet read or passed on
        self._size = 0
        self._complete = False  # the whole answer arrived
        self._error: BaseException | None = None  # how it failed, once it did
        self._waiter: asyncio.Future[None] | None = None  # a reader waiting for bytes
        self._sink: Sink | None = None
        self._on_end: OnEnd | None = None
        self._held = False  # the sink said wait
        self._reading = True
        self._last = self._loop.time()  # when the engine last sent something
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, socket: Path, request: bytes, read_timeout_s: float | None) -> EngineStream:
        """Connect, send `request` (`request_bytes`) and wait for the answer's status and
        headers (within the read timeout)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, stream = await loop.create_unix_connection(
                    lambda: cls(request, read_timeout_s), str(socket)
                )
        except TimeoutError:
            raise aiohttp.ClientConnectionError(
                f"no connection to the engine's socket within {CONNECT_TIMEOUT_S:g} s"
            ) from None
        except OSError as exc:
            raise aiohttp.ClientConnectionError(
                f"cannot connect to the engine's socket: {exc.strerror or exc}"
            ) from None
        try:
            await stream._head
        except BaseException:
            stream.close()
            raise
        return stream

    # ------------------------------------------------------------------ the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)
        if self._read_timeout_s is not None:
            self._timer = self._loop.call_later(self._read_timeout_s, self._watch)

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broke(aiohttp.ClientPayloadError(f"the engine's answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._complete:
            if exc is None:
                self._broke(aiohttp.ServerDisconnectedError("the engine closed the connection"))
            else:
                self._broke(aiohttp.ClientConnectionError(f"the engine's connection broke: {exc}"))

    def _watch(self) -> None:
        """The read timeout, checked by a timer rather than re-armed at every chunk."""
        assert self._read_timeout_s is not None
        now = self._loop.time()
        if not self._reading:
            self._last = now  # held for the client, not waiting for the engine
        silent = now - self._last
        if silent >= self._read_timeout_s:
            self._broke(TimeoutError(f"the engine sent nothing for {self._read_timeout_s:g} s"))
            return
        self._timer = self._loop.call_later(self._read_timeout_s - silent, self._watch)

    # ------------------------------------------------------------------ httptools' callbacks

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._error is not None:
            return  # the rest of a read after a failure (the sink's): nothing more is passed on
        if self._sink is not None and not self._held:
            try:
                go_on = self._sink(body)
            except Exception as exc:  # the sink's failure ends the stream, reported to on_end
                self.fail(exc)
                return
            if not go_on:
                self._hold()
            return
        self._chunks.append(body)
        self._size += len(body)
        if self._sink is None:
            self._wake()
            if self._size > HIGH_WATER:
                self._pause()

    def on_message_complete(self) -> None:
        if self._error is not None:
            return
        self._complete = True
        if self._transport is not None:
            self._transport.close()  # one answer per connection
        self._wake()
        self._ended()

    # ------------------------------------------------------------------ reading

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last read, waiting for some; b"" at the end.
        Raises how the stream failed once the bytes before the failure are read."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._resume_reading()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        while data := await self.readany():
            yield data

    def deliver(self, sink: Sink, on_end: OnEnd) -> None:
        """From now on pass the body to `sink` as it arrives (what was read ahead first), and
        call `on_end` once after the last of it."""
        self._sink, self._on_end = sink, on_end
        self.resume()

    def resume(self) -> None:
        """After the sink held the stream: what came meanwhile goes to it, then the rest."""
        assert self._sink is not None
        self._held = False
        while self._chunks and not self._held:
            data = self._chunks.pop(0)
            self._size -= len(data)
            try:
                go_on = self._sink(data)
            except Exception as exc:
                self.fail(exc)
                return
            self._held = not go_on
        if not self._held:
            self._resume_reading()
            self._ended()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()
        elif not self._head.done():
            self._head.cancel()

    # ------------------------------------------------------------------ ending

    def fail(self, exc: BaseException) -> None:
        """End the stream with `exc`, a failure its reader or sink's owner met: nothing more is
        passed on (a hold is let go), and `on_end` gets `exc` at once."""
        self._chunks.clear()
        self._held = False
        self._stop(exc)  # even after a whole answer: not all of it was passed on

    def _broke(self, exc: BaseException) -> None:
        """The engine's answer failed: a reader gets `exc` after the bytes before it, a sink's
        `on_end` once they are passed on."""
        if not self._complete:
            self._stop(exc)

    def _stop(self, exc: BaseException) -> None:
        """Record `exc` (the first failure stays), close the connection, wake a reader and tell
        the sink's owner once its turn comes."""
        if self._error is None:
            self._error = exc
            if not self._head.done():
                self._head.set_exception(exc)
        if self._transport is not None:
            self._transport.close()
        self._wake()
        self._ended()

    def _ended(self) -> None:
        """Tell the sink's owner, once everything before the end has gone to the sink."""
        if self._on_end is None or self._held or self._chunks:
            return
        if not (self._complete or self._error is not None):
            return
        on_end, self._on_end = self._on_end, None
        on_end(self._error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _hold(self) -> None:
        self._held = True
        self._pause()

    def _pause(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            with contextlib.suppress(RuntimeError):  # closing already
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self._transport is not None:
            self._reading = True
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()
