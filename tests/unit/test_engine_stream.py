"""A streamed engine answer on its own connection (`server.engine_stream`) and its relay to the
client from the connection's callback (`server.relay.RelayResponse`), against a real Unix-socket
server that writes an HTTP/1.1 chunked answer piece by piece, as an engine does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferd.observability.metrics import Metrics
from inferd.server.admission import Admission, Limits
from inferd.server.call import Call
from inferd.server.engine_stream import EngineStream, request_bytes
from inferd.server.relay import Relay, RelayResponse

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def event(i: int) -> bytes:
    return b'data: {"choices":[{"text":"t%d","index":0,"finish_reason":null}]}\n\n' % i


END = chunk(b'data: {"choices":[{"text":"","index":0,"finish_reason":"length"}]}\n\n')
END += chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Engine:
    """Serves one connection: records the request, then writes `writes` (bytes, or a float to
    pause that many seconds, or None to close the connection there); `closed` once it closed
    its side (as an engine stops generating when its client's connection closes)."""

    def __init__(self, path: Path, writes: list[bytes | float | None]) -> None:
        self.path, self.writes = path, writes
        self.request = b""
        self.closed = asyncio.Event()

    async def serve(self) -> asyncio.Server:
        return await asyncio.start_unix_server(self._one, str(self.path))

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.request = await reader.readuntil(b"\r\n\r\n")
        length = int(self.request.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        self.request += await reader.readexactly(length)
        try:
            for w in self.writes:
                if w is None:
                    break
                if isinstance(w, float):  # a pause, in which a client's close is seen
                    try:
                        if not await asyncio.wait_for(reader.read(1), w):
                            break
                    except TimeoutError:
                        pass
                else:
                    writer.write(w)
                    await writer.drain()
            else:  # all written: wait for the client to close (it reads one answer)
                await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()


def run(
    tmp_path: Path,
    writes: list[bytes | float | None],
    body: Callable[[Path, Engine], Awaitable[Any]],
) -> Any:
    async def main() -> Any:
        sock = tmp_path / "engine.sock"
        engine = Engine(sock, writes)
        server = await engine.serve()
        try:
            return await asyncio.wait_for(body(sock, engine), 10)
        finally:
            server.close()

    return asyncio.run(main())


REQUEST = request_bytes("/v1/completions", {"X-Request-Id": "r-1"}, b'{"stream":true}')


async def read_all(stream: EngineStream) -> bytes:
    return b"".join([c async for c in stream.chunks()])


def test_the_request_goes_out_as_written_and_the_body_comes_back_whole(tmp_path: Path) -> None:
    # Cut anywhere (inside the status line, a chunk's size and its data): the body is the same.
    whole = HEAD + chunk(event(1)) + chunk(event(2)) + END
    writes: list[bytes | float | None] = [whole[:7], 0.01, whole[7:90], 0.01, whole[90:]]

    async def body(sock: Path, engine: Engine) -> tuple[int, bytes, bytes]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        return stream.status, await read_all(stream), engine.request

    status, got, request = run(tmp_path, writes, body)
    assert status == 200
    assert got.startswith(event(1) + event(2)) and got.endswith(b"data: [DONE]\n\n")
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: engine\r\n")
    assert b"\r\nConnection: close\r\n" in request and b"\r\nX-Request-Id: r-1\r\n" in request
    assert request.endswith(b"\r\nContent-Length: 15\r\n\r\n" + b'{"stream":true}')


def test_an_error_status_is_read_with_its_body(tmp_path: Path) -> None:
    answer = b'{"error":{"message":"no"}}'
    writes: list[bytes | float | None] = [
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer)
    ]

    async def body(sock: Path, engine: Engine) -> tuple[int, bytes]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        return stream.status, await read_all(stream)

    assert run(tmp_path, writes, body) == (400, answer)


def test_a_connection_that_breaks_mid_answer_is_an_error_after_what_came(tmp_path: Path) -> None:
    writes: list[bytes | float | None] = [HEAD + chunk(event(1)), 0.05, None]

    async def body(sock: Path, engine: Engine) -> tuple[bytes, BaseException | None]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        first = await stream.readany()
        try:
            await stream.readany()
        except aiohttp.ServerDisconnectedError as exc:
            return first, exc
        return first, None

    first, error = run(tmp_path, writes, body)
    assert first == event(1) and error is not None


def test_an_engine_silent_past_the_read_timeout_fails_the_stream(tmp_path: Path) -> None:
    writes: list[bytes | float | None] = [HEAD + chunk(event(1)), 3.0]

    async def body(sock: Path, engine: Engine) -> float:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError, match=r"sent nothing for 0\.3 s"):
            await read_all(stream)
        return loop.time() - start

    assert 0.2 < run(tmp_path, writes, body) < 1.5


def test_an_answer_that_is_not_http_and_a_socket_with_nobody_are_engine_errors(
    tmp_path: Path,
) -> None:
    async def body(sock: Path, engine: Engine) -> None:
        with pytest.raises(aiohttp.ClientPayloadError, match="not valid HTTP"):
            await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        with pytest.raises(aiohttp.ClientConnectionError, match="cannot connect"):
            await EngineStream.open(tmp_path / "nobody.sock", REQUEST, read_timeout_s=5)

    run(tmp_path, [b"SSH-2.0-OpenSSH\r\n\r\n"], body)


def test_a_line_break_in_a_header_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        request_bytes("/v1/completions", {"X-Request-Id": "a\r\nEvil: 1"}, b"{}")


def test_a_sink_gets_every_chunk_in_order_across_holds_and_the_end_once(tmp_path: Path) -> None:
    events = [event(i) for i in range(30)]
    # Several chunks per write: a hold in the middle of one write keeps the rest for later.
    writes: list[bytes | float | None] = [HEAD]
    for i in range(0, 30, 3):
        writes += [b"".join(chunk(e) for e in events[i : i + 3]), 0.002]
    writes.append(b"0\r\n\r\n")

    async def body(sock: Path, engine: Engine) -> tuple[list[bytes], list[object]]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        got: list[bytes] = []
        ends: list[object] = []
        loop = asyncio.get_running_loop()

        def sink(data: bytes) -> bool:
            got.append(data)
            if len(got) % 4 == 0:  # a send that waits: resumed a little later
                loop.call_later(0.005, stream.resume)
                return False
            return True

        stream.deliver(sink, ends.append)
        await engine.closed.wait()
        await asyncio.sleep(0.05)
        return got, ends

    got, ends = run(tmp_path, writes, body)
    assert b"".join(got) == b"".join(events)
    assert ends == [None]


def test_a_failure_while_held_is_told_after_the_chunks_before_it(tmp_path: Path) -> None:
    writes: list[bytes | float | None] = [HEAD + chunk(event(1)) + chunk(event(2)), 0.05, None]

    async def body(sock: Path, engine: Engine) -> tuple[list[bytes], list[object]]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        got: list[bytes] = []
        ends: list[object] = []

        def sink(data: bytes) -> bool:
            got.append(data)
            return False  # every chunk holds the stream, as a send that waits

        stream.deliver(sink, ends.append)
        await engine.closed.wait()
        await asyncio.sleep(0.05)
        assert ends == []  # not before what came first is passed on
        while not ends:
            stream.resume()
            await asyncio.sleep(0.01)
        return got, ends

    got, ends = run(tmp_path, writes, body)
    assert b"".join(got) == event(1) + event(2)
    assert len(ends) == 1 and isinstance(ends[0], aiohttp.ServerDisconnectedError)


def test_a_sink_that_fails_ends_the_stream_and_gets_nothing_more(tmp_path: Path) -> None:
    # Three chunks and the end in one read: the sink fails at the first.
    writes: list[bytes | float | None] = [HEAD, 0.02, chunk(event(1)) + chunk(event(2)) + END]

    async def body(sock: Path, engine: Engine) -> tuple[int, list[object]]:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        calls: list[bytes] = []
        ends: list[object] = []

        def sink(data: bytes) -> bool:
            calls.append(data)
            raise ValueError("the relay failed")

        stream.deliver(sink, ends.append)
        await asyncio.wait_for(engine.closed.wait(), 2)
        return len(calls), ends

    calls, ends = run(tmp_path, writes, body)
    assert calls == 1
    assert len(ends) == 1 and isinstance(ends[0], ValueError)


# -- the relay from the connection's callback


def _call(path: str = "/v1/completions") -> Call:
    metrics = Metrics()
    admission = Admission(
        "m", Limits(4, 4, 1.0), metrics.requests_running, metrics.requests_waiting
    )
    slot = asyncio.run(admission.acquire())
    return Call("m", metrics, path, "rid", slot=slot)


class Client:
    """An ASGI server's side of one response: `send` waits on every `wait_every`-th body (a
    client whose socket is full), and after waiting raises `fails_with` if set; `receive` says
    the client left once `leave` is set."""

    def __init__(self, wait_every: int = 0, fails_with: Exception | None = None) -> None:
        self.wait_every = wait_every
        self.fails_with = fails_with
        self.bodies: list[bytes] = []
        self.messages: list[MutableMapping[str, Any]] = []
        self.leave = asyncio.Event()
        self.waited = 0

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] != "http.response.body":
            return
        self.bodies.append(message.get("body", b""))
        if self.wait_every and len(self.bodies) % self.wait_every == 0:
            self.waited += 1
            await asyncio.sleep(0.003)
            if self.fails_with is not None:
                raise self.fails_with

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def _relay_through(
    tmp_path: Path, writes: list[bytes | float | None], client: Client, call: Call
) -> tuple[list[int], Call]:
    ended: list[int] = []

    async def body(sock: Path, engine: Engine) -> None:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=5)
        call.upstream = stream
        supervisor: Any = type("S", (), {"report_failure": lambda self, reason: None})()
        response = RelayResponse(stream, Relay(call, None, 2**20), supervisor, _ends(ended))
        await response({"type": "http"}, client.receive, client.send)

    run(tmp_path, writes, body)
    return ended, call


def _ends(ended: list[int]) -> Callable[[Call, int], None]:
    return lambda call, status: ended.append(status)


def test_the_relay_passes_every_event_on_in_order_when_sends_wait(tmp_path: Path) -> None:
    events = [event(i) for i in range(40)]
    writes: list[bytes | float | None] = [HEAD]
    for i in range(0, 40, 2):  # two events a write, as a burst of tokens
        writes += [chunk(events[i]) + chunk(events[i + 1]), 0.001]
    writes.append(END)
    client = Client(wait_every=3)
    ended, call = _relay_through(tmp_path, writes, client, _call())
    sent = b"".join(client.bodies)
    assert sent.startswith(b"".join(events)) and sent.endswith(b"data: [DONE]\n\n")
    assert client.waited > 5  # the held path was taken, not only the direct one
    assert client.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert ended == [200] and call.finish_reason == "length"


def test_a_send_that_fails_after_waiting_ends_the_relay(tmp_path: Path) -> None:
    """The client's connection fails while a send waits for it (an ASGI 2.4 server raises
    OSError): the relay ends at once, the engine's connection closed, not held for ever."""
    writes: list[bytes | float | None] = [HEAD]
    writes += [chunk(event(i)) for i in range(10)] + [END]
    client = Client(wait_every=3, fails_with=ConnectionResetError("the client went away"))
    ended, _ = _relay_through(tmp_path, writes, client, _call())
    assert client.waited == 1 and len(client.bodies) == 3
    assert ended == [499]


def test_a_broken_engine_ends_the_relay_with_an_error_event(tmp_path: Path) -> None:
    writes: list[bytes | float | None] = [HEAD + chunk(event(1)), 0.02, None]
    client = Client()
    ended, _ = _relay_through(tmp_path, writes, client, _call())
    sent = b"".join(client.bodies)
    assert sent.startswith(event(1))
    error = json.loads(sent.split(b"\n\n")[1].removeprefix(b"data: "))
    assert error["error"]["code"] == "engine_unavailable"
    assert sent.endswith(b"data: [DONE]\n\n") and ended == [502]


def test_a_client_that_leaves_ends_the_stream_and_closes_the_engine(tmp_path: Path) -> None:
    writes: list[bytes | float | None] = [HEAD + chunk(event(1)), 5.0, END]
    client = Client()
    call = _call()
    loop_time: list[float] = []

    async def leave_soon() -> None:
        await asyncio.sleep(0.1)
        client.leave.set()

    async def body(sock: Path, engine: Engine) -> None:
        stream = await EngineStream.open(sock, REQUEST, read_timeout_s=10)
        supervisor: Any = type("S", (), {"report_failure": lambda self, reason: None})()
        ended: list[int] = []
        response = RelayResponse(stream, Relay(call, None, 2**20), supervisor, _ends(ended))
        leaving = asyncio.ensure_future(leave_soon())
        start = asyncio.get_running_loop().time()
        await response({"type": "http"}, client.receive, client.send)
        await leaving
        await asyncio.wait_for(engine.closed.wait(), 2)  # the engine saw its client go
        loop_time.append(asyncio.get_running_loop().time() - start)
        assert ended == [499]

    run(tmp_path, writes, body)
    assert loop_time[0] < 2
    assert b"".join(client.bodies) == event(1)  # no closing message to a client gone
