"""A recorded engine: replays real vLLM 0.32.0 responses (tests/fixtures/vllm-0.32.0) over HTTP.

Run as its own process by the integration tests, through inferd's real supervisor, so that the
front's proxying, streaming, error mapping, restarts and shutdown are tested fast and with faults
a real engine will not produce on demand. What the user message says picks the behaviour:

    "crash"    stream two events, then the process dies (engine crash mid-stream)
    "slow"     stream with 0.3 s between events (to see events arrive one by one, and to hang up)
    "hold"     answer nothing for 1 s, then as usual (a long prompt: its first token comes late)
    "late"     a stream's headers at once, its first event after 1 s (llama-server's way with a
               long prompt)
    "invalid"  answer with vLLM's real 400 body
    "flood"    stream `FLOOD_EVENTS` token events as fast as it can write (each ~500 bytes, its
               content `w<i> ` and padding), then the recorded end (a client slower than this)
    otherwise  replay the recorded answer (streamed or not)

It listens where vLLM would: on the Unix socket `--uds PATH` (as inferd starts every engine), or
on `--host`/`--port` without it. `GET /debug/open-streams` says how many streams are in progress
(to check that a client that hangs up makes the front close the engine connection).
`--ready-after S` delays listening (vLLM binds at once, llama-server once the model is loaded);
`--exit-at-start` fails at once.
`--drop-reused` closes, unanswered, every completion request that arrives on a connection that
has carried one before (llama-server's extra HTTP threads close theirs after one request, and the
front's pool then reuses them). `--require-key` answers 401 to any request (but /debug/*) without
`Authorization: Bearer $RECORDED_API_KEY`, the key the supervisor gives each start, as the real
engines do with theirs; `/debug/open-streams` also says how many it refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32.0"


FLOOD_EVENTS = 10_000


def _flood(events: list[bytes]) -> list[bytes]:
    """The recorded stream with `FLOOD_EVENTS` token events in place of its own."""
    token = json.loads(events[1].removeprefix(b"data: "))
    flood = []
    for i in range(FLOOD_EVENTS):
        token["choices"][0]["delta"]["content"] = f"w{i} " + "x" * 400
        flood.append(b"data: " + json.dumps(token, separators=(",", ":")).encode() + b"\n\n")
    end = [e for e in events[1:] if b'"finish_reason":null' not in e]  # finish, usage, DONE
    return [events[0], *flood, *end]


def _events() -> list[bytes]:
    raw = (FIXTURES / "chat-stream-usage.sse").read_bytes()
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e.strip()]


class Recorded:
    def __init__(self, drop_reused: bool = False) -> None:
        self.open_streams = 0
        self.events = _events()
        self.drop_reused = drop_reused
        # Connections answered once (by their transport: a Unix socket's peers have no address).
        self.served_on: set[object] = set()
        self.dropped = 0
        self.refused = 0  # requests without the key (--require-key)
        self.held = 0  # "hold" requests not answered yet (their client may have gone)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.drop_reused and request.transport is not None:
            if request.transport in self.served_on:
                self.dropped += 1
                request.transport.close()
                return web.Response(status=500)  # never sent: the connection is gone
            self.served_on.add(request.transport)
        if request.content_type != "application/json":
            return web.json_response(
                {
                    "error": {
                        "message": "Only 'application/json' is allowed",
                        "type": "Bad Request",
                        "code": 400,
                    }
                },
                status=400,
            )
        body = await request.json()
        messages = (
            body.get("messages")
            if request.path.endswith("chat/completions")
            else [{"content": body.get("prompt")}]
        )
        # Like vLLM, refuse what it cannot read with a 400 rather than crash.
        if not (
            isinstance(messages, list)
            and messages
            and isinstance(messages[-1], dict)
            and isinstance(messages[-1].get("content"), str)
        ):
            return web.json_response(
                {
                    "error": {
                        "message": "1 validation error: messages/prompt",
                        "type": "Bad Request",
                        "param": "body.messages",
                        "code": 400,
                    }
                },
                status=400,
            )
        text = messages[-1]["content"]
        if text == "hold":
            await self._hold()
        if text == "invalid":
            return web.Response(
                body=(FIXTURES / "error-max-tokens.json").read_bytes(),
                status=400,
                content_type="application/json",
            )
        if not body.get("stream"):
            return web.Response(
                body=(FIXTURES / "chat.json").read_bytes(), content_type="application/json"
            )
        with_usage = (body.get("stream_options") or {}).get("include_usage")
        events = [e for e in self.events if with_usage or b'"choices":[]' not in e]
        if text == "flood":
            events = _flood(events)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if text == "late":
            await self._hold()
        self.open_streams += 1
        try:
            for i, event in enumerate(events):
                if text == "crash" and i == 2:
                    os._exit(3)
                await resp.write(event)
                if text != "flood":
                    await asyncio.sleep(0.3 if text == "slow" else 0.001)
        finally:
            self.open_streams -= 1
        return resp

    async def _hold(self) -> None:
        """Answer nothing for 1 s (a long prompt), counted in `held` meanwhile."""
        self.held += 1
        try:
            await asyncio.sleep(1.0)
        finally:
            self.held -= 1

    async def fixture(self, request: web.Request) -> web.Response:
        name = {
            "/v1/models": "models.json",
            "/version": "version.json",
            "/tokenize": "tokenize.json",
            "/metrics": "metrics.txt",
        }[request.path]
        kind = "text/plain" if name.endswith(".txt") else "application/json"
        return web.Response(body=(FIXTURES / name).read_bytes(), content_type=kind)

    async def health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def open_count(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "open": self.open_streams,
                "dropped": self.dropped,
                "refused": self.refused,
                "held": self.held,
            }
        )

    def key_check(self, key: str) -> Middleware:
        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith("/debug/") or (
                key and request.headers.get("Authorization") == f"Bearer {key}"
            ):
                return await handler(request)
            self.refused += 1
            return web.json_response({"error": {"message": "Invalid API Key"}}, status=401)

        return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uds", help="a Unix socket path: then --host and --port are ignored")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-at-start", action="store_true")
    parser.add_argument("--drop-reused", action="store_true")
    parser.add_argument("--require-key", action="store_true")
    parser.add_argument(
        "--loud-at-stop",
        action="store_true",
        help="on SIGTERM, print an error and a traceback first, as vLLM's server does when its "
        "engine core ends before it",
    )
    args = parser.parse_args()
    where = args.uds or f"{args.host}:{args.port}"
    print(json.dumps({"recorded engine": "starting", "listen": where}), flush=True)
    if args.exit_at_start:
        print("ERROR recorded engine told to fail at start", file=sys.stderr, flush=True)
        sys.exit(4)
    rec = Recorded(args.drop_reused)
    app = web.Application(
        middlewares=[rec.key_check(os.environ.get("RECORDED_API_KEY", ""))]
        if args.require_key
        else []
    )
    app.router.add_post("/v1/chat/completions", rec.chat)
    app.router.add_post("/v1/completions", rec.chat)
    for path in ("/v1/models", "/version", "/metrics"):
        app.router.add_get(path, rec.fixture)
    app.router.add_post("/tokenize", rec.fixture)
    app.router.add_get("/health", rec.health)
    app.router.add_get("/debug/open-streams", rec.open_count)

    async def serve() -> None:
        if args.loud_at_stop:

            def loud() -> None:
                # In vLLM's own format ("(APIServer pid=N) ERROR ...").
                print(
                    f"(APIServer pid={os.getpid()}) ERROR recorded engine stopped: "
                    "its core is gone",
                    file=sys.stderr,
                )
                print("Traceback (most recent call last):", file=sys.stderr, flush=True)
                os._exit(0)

            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, loud)
        await asyncio.sleep(args.ready_after)
        runner = web.AppRunner(app)
        await runner.setup()
        site = (
            web.UnixSite(runner, args.uds)
            if args.uds
            else web.TCPSite(runner, args.host, args.port)
        )
        await site.start()
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
