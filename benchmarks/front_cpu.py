"""The front's CPU per streamed token, in-process: a llama-server chat stream through the relay.

A real llama-server capture (tests/fixtures/recorded/responses/llamacpp-chat-stream.sse: one
event per token, the finish event, the usage event with llama-server's `timings`, `[DONE]`) is
stretched to `--tokens` token events and fed, one event per read as llama-server sends them,
through the code a streamed chat request runs in the front. Three depths:

- `relay`: `relay.chat_events` alone (`Call.observe_events`, `conform.stream_events`, no rails);
- `asgi`: the whole ASGI stack a streamed answer goes through, built as `server.app` builds it
  (FastAPI, the error handlers, `RequestIdMiddleware`), the route answering a `RelayResponse`,
  called as uvicorn calls it (ASGI spec 2.3), its `send` keeping the bytes.

- `socket`: the same app served by uvicorn as `server.runtime` serves it (uvloop, httptools, the
  guarded protocol, `InFlight`), the route posting to a stand-in llama-server in another process
  (chunked SSE over a Unix socket, one event per write every `--pace-ms`) through aiohttp as
  `EngineLink` and `EngineClient` set it up, and curl reading the answer: everything the front
  does per token, its socket reads and writes and event-loop turns included.

For `relay` and `asgi` the engine side is a stand-in for aiohttp's `StreamReader.iter_any` that
yields one event per read and, with `--yield-per-event` (the default), gives the event loop one
turn per event, as a real socket read does.

CPU time is the front process's `time.process_time` over `--streams` streams, repeated
`--repeats` times; the table gives min / median / max microseconds per token event.

Usage: python benchmarks/front_cpu.py [--tokens 1000] [--streams 20] [--repeats 5]
       [--depth relay,asgi,socket] [--socket-streams 3] [--pace-ms 2] [--no-yield-per-event]
       [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from fastapi import FastAPI, Request
from starlette.types import Message

from inferd.config import load_settings
from inferd.observability.metrics import Metrics
from inferd.server import errors
from inferd.server.call import Call
from inferd.server.context import RequestIdMiddleware
from inferd.server.engine_client import EngineSessions
from inferd.server.engine_link import EngineLink
from inferd.server.relay import RelayResponse, chat_events
from inferd.server.runtime import ClientLimits, InFlight, guarded_protocol

CAPTURE = (
    Path(__file__).resolve().parent.parent
    / "tests/fixtures/recorded/responses/llamacpp-chat-stream.sse"
)
CHAT = "/v1/chat/completions"


def llama_server_stream(tokens: int) -> list[bytes]:
    """The capture's events, its token events repeated to `tokens` of them: the first event
    (the role), token events, the finish event, the usage event (with `timings`), `[DONE]`."""
    events = [e + b"\n\n" for e in CAPTURE.read_bytes().split(b"\n\n") if e.strip()]
    first, body, tail = events[0], events[1:-3], events[-3:]
    assert b'"role":"assistant"' in first and b'"timings"' in tail[1] and b"[DONE]" in tail[2]
    out = [first]
    while len(out) - 1 < tokens:
        out.extend(body[: tokens - (len(out) - 1)])
    return out + tail


class _Content:
    def __init__(self, events: list[bytes], yield_per_event: bool) -> None:
        self.events, self.yield_per_event = events, yield_per_event

    async def iter_any(self) -> AsyncIterator[bytes]:
        for event in self.events:
            if self.yield_per_event:
                await asyncio.sleep(0)  # one turn of the loop per read, as a socket read has
            yield event


class FakeResponse:
    """What `chat_events` reads of an `aiohttp.ClientResponse`."""

    def __init__(self, events: list[bytes], yield_per_event: bool) -> None:
        self.content = _Content(events, yield_per_event)

    def close(self) -> None:
        pass


class _Supervisor:
    def report_failure(self, reason: str) -> None:
        raise AssertionError(reason)


def _call(metrics: Metrics) -> Call:
    call = Call("smollm2-135m-instruct", metrics, CHAT, "bench")
    call.strip_usage = True  # the client did not ask for usage: inferd asked on its behalf
    return call


def _end(call: Call, status: int) -> None:
    call.finish(status)


async def relay_once(events: list[bytes], metrics: Metrics, yield_per_event: bool) -> bytes:
    call = _call(metrics)
    resp: Any = FakeResponse(events, yield_per_event)
    out = [b async for b in chat_events(resp, call, _Supervisor(), _end)]  # type: ignore[arg-type]
    return b"".join(out)


Upstream = Callable[[], Awaitable[Any]]  # the engine's answer, as `chat_events` reads it


def build_app(upstream: Upstream, metrics: Metrics) -> FastAPI:
    """The ASGI stack of `server.app.create_app` around one streamed chat route."""
    app = FastAPI()
    errors.install(app)
    app.add_middleware(RequestIdMiddleware)

    @app.post(CHAT)
    async def chat(request: Request) -> RelayResponse:
        call = _call(metrics)
        resp = await upstream()
        stream = chat_events(resp, call, _Supervisor(), _end)  # type: ignore[arg-type]
        return RelayResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            on_close=lambda: call.finish(499),
        )

    return app


async def asgi_once(app: FastAPI) -> bytes:
    body: list[bytes] = []
    done = asyncio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    request_sent = False

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            body.append(message["body"])
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return b"".join(body)


def fake_upstream(events: list[bytes], yield_per_event: bool) -> Upstream:
    async def upstream() -> Any:
        return FakeResponse(events, yield_per_event)

    return upstream


async def measure(depth: str, tokens: int, streams: int, yield_per_event: bool) -> float:
    """CPU microseconds per token event over `streams` streams."""
    events = llama_server_stream(tokens)
    metrics = Metrics()
    app = build_app(fake_upstream(events, yield_per_event), metrics)

    def run() -> Awaitable[bytes]:
        if depth == "relay":
            return relay_once(events, metrics, yield_per_event)
        return asgi_once(app)

    await run()  # warm: imports, regex caches, first-call paths
    start = time.process_time()
    for _ in range(streams):
        await run()
    return (time.process_time() - start) / (streams * len(events)) * 1e6


# A stand-in llama-server: each request answered with the events of the file in argv[2], one
# chunked-encoding chunk per event (as llama-server's HTTP library writes them), one every
# argv[3] seconds, on the Unix socket argv[1]; connections kept alive.
ENGINE = r"""
import asyncio, sys
sock, pace = sys.argv[1], float(sys.argv[3])
events = [e + b"\n\n" for e in open(sys.argv[2], "rb").read().split(b"\n\n") if e]
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n")
async def handle(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        writer.write(HEAD)
        for e in events:
            await asyncio.sleep(pace)
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_unix_server(handle, sock)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


async def socket_streams(
    tokens: int, streams: int, repeats: int, pace_ms: float, out: Path | None = None
) -> list[float]:
    """CPU microseconds per token event of this process (the front), per repeat, over
    `streams` streams each, served over real sockets (see `socket` in the module's text);
    with `out`, one stream written there instead."""
    events = llama_server_stream(tokens)
    with tempfile.TemporaryDirectory(prefix="front-cpu-") as tmp:
        stream_file, sock_path = Path(tmp) / "stream.sse", Path(tmp) / "engine.sock"
        stream_file.write_bytes(b"".join(events))
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ENGINE, str(sock_path), str(stream_file), str(pace_ms / 1000)
        )
        link: EngineLink | None = None
        server: uvicorn.Server | None = None
        serving: asyncio.Task[None] | None = None
        try:
            while not sock_path.exists():  # noqa: ASYNC110 (no event for a file to appear)
                await asyncio.sleep(0.05)
            link = EngineLink(sock_path)
            timeout = EngineSessions(600.0).timeout  # the front's default read timeout
            pool = link.pool

            async def upstream() -> Any:
                return await pool.post(
                    EngineLink.url(CHAT),
                    data=b"{}",
                    headers={"Content-Type": "application/json", "X-Request-Id": "bench"},
                    timeout=timeout,
                )

            app = build_app(upstream, Metrics())
            config = uvicorn.Config(
                InFlight(app),
                http=guarded_protocol(ClientLimits.of(load_settings({}, env={}))),
                log_config=None,
                access_log=False,
                lifespan="off",
            )
            server = uvicorn.Server(config)
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{listener.getsockname()[1]}{CHAT}"
            serving = asyncio.create_task(server.serve(sockets=[listener]))
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.05)

            async def one(target: str = "/dev/null") -> float:
                curl = await asyncio.create_subprocess_exec(
                    "curl", "-sSfN", "-o", target, "-X", "POST", "-d", "{}", url
                )
                start = time.process_time()
                assert await curl.wait() == 0, "curl failed"
                return time.process_time() - start

            if out is not None:
                await one(str(out))
                return []
            await one()  # warm
            per_event = []
            for _ in range(repeats):
                cpu = sum([await one() for _ in range(streams)])
                per_event.append(cpu / (streams * len(events)) * 1e6)
            return per_event
        finally:
            if server is not None and serving is not None:
                server.should_exit = True
                await serving
            if link is not None:
                await link.close()
            engine.terminate()
            await engine.wait()


def check(tokens: int) -> None:
    """The relayed bytes: every token event as the engine sent it, no usage event (inferd asked
    for it), `[DONE]` at the end; the same at every depth."""
    events = llama_server_stream(tokens)
    out = asyncio.run(relay_once(events, Metrics(), False))
    app = build_app(fake_upstream(events, False), Metrics())
    assert asyncio.run(asgi_once(app)) == out
    assert out == b"".join(events[:-2]) + events[-1], "the relay changed the token events"
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "answer"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(socket_streams(tokens, 1, 1, 0.1, out=target))
        assert target.read_bytes() == out, "the bytes served over sockets differ"
    print(f"check: {len(events)} events relayed, {len(out)} bytes, as expected at every depth")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--depth", default="relay,asgi,socket")
    p.add_argument("--socket-streams", type=int, default=3, help="streams per repeat (socket)")
    p.add_argument("--pace-ms", type=float, default=2.0, help="between engine events (socket)")
    p.add_argument("--no-yield-per-event", dest="yield_per_event", action="store_false")
    p.add_argument("--check", action="store_true", help="check the relayed bytes first")
    args = p.parse_args()
    if args.check:
        check(args.tokens)
    print(
        f"{args.tokens} tokens x {args.streams} streams, {args.repeats} repeats, yield per "
        f"event: {args.yield_per_event}"
    )
    print("| depth | CPU us per event: min / median / max |")
    print("|---|---|")
    for depth in args.depth.split(","):
        if depth == "socket":
            streams = socket_streams(args.tokens, args.socket_streams, args.repeats, args.pace_ms)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runs = runner.run(streams)
        else:
            runs = [
                asyncio.run(measure(depth, args.tokens, args.streams, args.yield_per_event))
                for _ in range(args.repeats)
            ]
        print(f"| {depth} | {min(runs):.1f} / {statistics.median(runs):.1f} / {max(runs):.1f} |")


if __name__ == "__main__":
    main()
