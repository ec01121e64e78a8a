"""The front's CPU per streamed token, and while idle, beside relays that do less.

On a small CPU llama.cpp's threads hold every core while they decode, so each microsecond the
front spends relaying a token, and each wake-up while idle, is taken from the engine (issue 18:
the front's cost on llama.cpp within 3% of output rate). This measures where that cost stands
against what any relay costs. One `inferd serve --profile P` (and, with
`--baseline-src`, another from a second source tree, with an engine of its own: a change to the
front measured beside what it changes); beside it, on the same engine socket (with its start's
key, found as `serve_overhead.engine_of` does):

- `pipe`: a raw byte pipe (asyncio streams on uvloop), client TCP <-> engine socket: the floor
  for any relay process (two socket operations and a wake-up per token);
- `callback`: an HTTP relay with no task between the sockets (`run_callback_relay`: both sides
  parsed by httptools, each chunk written to the client from the engine connection's callback):
  what a token costs once its path is out of the ASGI stack and aiohttp;
- `asgi`: a bare ASGI app on uvicorn (httptools, uvloop) posting with aiohttp, as the front does;
- `starlette`: the same as a Starlette route returning a `StreamingResponse`.

Each round streams one `/v1/completions` (`--tokens` tokens, ignore_eos) through each setup,
the order rotating; CPU is the process's own (all its threads, `/proc/PID/task/*/schedstat`,
nanoseconds), divided by the events received. Before the rounds, the front's wake-ups and CPU
while idle are counted over `--idle-windows` windows of `--idle-seconds`.

With `--variant NAME=SRC` (repeatable), more source trees are served the same way, each a
setup of its own: several changes to the front measured in one run, against one another.

Usage: python benchmarks/front_vs_relays.py [--profile llamacpp-cpu-q4_1] [--rounds 5]
       [--tokens 1500] [--baseline-src OTHER_CHECKOUT/src] [--variant NAME=SRC ...]
Prints markdown tables and writes the raw figures as JSON under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from engine_profiles import median_spread
from serve_overhead import (
    client,
    engine_of,
    environment,
    free_port,
    stop,
    story,
    stream_pace,
    wait_http,
)

HERE = Path(__file__).resolve().parent
RELAYS = ("pipe", "callback", "asgi", "starlette")


def cpu_s(pid: int) -> float:
    """CPU time of every thread of `pid`, in seconds."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def wakeups(pid: int) -> int:
    """Times the threads of `pid` went to sleep and were woken (voluntary switches)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        status = (t / "status").read_text()
        total += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
    return total


# -- the relays beside the front (run as `front_vs_relays.py --relay KIND ...`)


def run_relay(kind: str, port: int, socket: str, key: str) -> None:
    if kind == "pipe":
        import uvloop

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
            w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            er, ew = await asyncio.open_unix_connection(socket)
            await asyncio.gather(pipe(cr, ew), pipe(er, cw))

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", port)
            await server.serve_forever()

        uvloop.run(main())
        return
    if kind == "callback":
        run_callback_relay(port, socket, key)
        return
    import aiohttp
    import uvicorn

    session: list[aiohttp.ClientSession] = []

    async def post(body: bytes) -> aiohttp.ClientResponse:
        if not session:
            connector = aiohttp.UnixConnector(path=socket, limit=0)
            session.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        url = "http://engine/v1/completions"
        return await session[0].post(url, data=body, headers=headers, timeout=timeout)

    app: Any
    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        async def endpoint(request: Request) -> StreamingResponse:
            resp = await post(await request.body())
            return StreamingResponse(resp.content.iter_any(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/completions", endpoint, methods=["POST"])])
    else:

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body, more = b"", True
            while more:
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            resp = await post(body)
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                log_level="warning", access_log=False)  # fmt: skip


def run_callback_relay(port: int, socket: str, key: str) -> None:
    """An HTTP relay with no task between the two sockets: both sides' HTTP parsed in C
    (httptools, as uvicorn's), each chunk of the engine's answer looked at (finish reason,
    usage) and written to the client's transport from the engine connection's `data_received`
    callback. What relaying a token costs once it is out of the ASGI stack and aiohttp."""
    import httptools
    import uvloop

    opening: set[asyncio.Task[Any]] = set()  # engine connections being opened

    class Engine(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport, request: bytes) -> None:
            self.client, self.request = client, request
            self.parser = httptools.HttpResponseParser(self)
            self.seen = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            cast(asyncio.Transport, transport).write(self.request)  # uvloop's: not a subclass

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_headers_complete(self) -> None:
            self.client.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip

        def on_body(self, body: bytes) -> None:
            if b'"finish_reason":"' in body or b'"usage"' in body:
                self.seen += 1  # where the front reads a stream's end and its usage
            self.client.write(b"%x\r\n%b\r\n" % (len(body), body))

        def on_message_complete(self) -> None:
            self.client.write(b"0\r\n\r\n")
            self.client.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body = b"".join(self.body)
            head = (
                "POST /v1/completions HTTP/1.1\r\nhost: engine\r\n"
                f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            loop, client = asyncio.get_running_loop(), self.transport
            task = loop.create_task(
                loop.create_unix_connection(lambda: Engine(client, head.encode() + body), socket)
            )
            opening.add(task)
            task.add_done_callback(opening.discard)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# -- the measurement


def stream(base: str, tokens: int, key: str | None) -> tuple[int, float]:
    """Events received and ms per event (first to last) of one streamed completion."""
    with client(None, key, timeout=600) as c:
        return stream_pace(c, base, story(tokens))


def idle(pid: int, windows: int, seconds: float) -> list[dict[str, float]]:
    got = []
    for _ in range(windows):
        w0, c0 = wakeups(pid), cpu_s(pid)
        time.sleep(seconds)
        got.append({"wakeups_per_s": (wakeups(pid) - w0) / seconds,
                    "cpu_ms_per_s": (cpu_s(pid) - c0) * 1000 / seconds})  # fmt: skip
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", default="llamacpp-cpu-q4_1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1500, help="tokens per streamed answer")
    parser.add_argument("--idle-windows", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--setups", default="inferd,baseline," + ",".join(RELAYS))
    parser.add_argument("--cache-path", type=Path, default=None)
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="another inferd source tree (its `src`), served beside as setup `baseline`",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="another inferd source tree served beside as setup NAME (repeatable; name it in "
        "--setups)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--relay", choices=RELAYS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        run_relay(args.relay, args.port, args.socket, args.key)
        return
    setups = args.setups.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFERD_TUNE_IN_BACKGROUND": "false"}
    if args.cache_path:
        env["INFERD_CACHE_PATH"] = str(args.cache_path)
    fronts = {"inferd": env}
    if args.baseline_src:
        fronts["baseline"] = {**env, "PYTHONPATH": str(args.baseline_src.resolve())}
    for variant in args.variant:
        name, _, src = variant.partition("=")
        if not name or not src:
            parser.error(f"--variant takes NAME=SRC, not {variant!r}")
        fronts[name] = {**env, "PYTHONPATH": str(Path(src).resolve())}
    started: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    relays: list[subprocess.Popen[bytes]] = []
    try:
        for name, front_env in fronts.items():
            port, log = free_port(), args.out / f"{name}.log"
            argv = ["-m", "inferd", "serve", "--port", str(port), "--profile", args.profile]
            started[name] = (
                subprocess.Popen([sys.executable, *argv], env=front_env, stdout=log.open("wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True),
                port,
                log,
            )  # fmt: skip
        sides: dict[str, tuple[str, int, str | None]] = {}
        for name, (proc, port, _log) in started.items():
            wait_http(f"http://127.0.0.1:{port}/v1/health/ready", proc, timeout=600)
            sides[name] = (f"http://127.0.0.1:{port}/v1/completions", proc.pid, None)
        front, _, log = started["inferd"]
        socket, key = engine_of(front, log)
        for kind in RELAYS:
            if kind not in setups:
                continue
            rport = free_port()
            argv = ["--relay", kind, "--port", str(rport), "--socket", str(socket), "--key", key]
            relays.append(subprocess.Popen([sys.executable, __file__, *argv]))
            sides[kind] = (f"http://127.0.0.1:{rport}/v1/completions", relays[-1].pid,
                           key if kind == "pipe" else None)  # fmt: skip
        time.sleep(5)  # the relays' imports
        quiet = {name: idle(proc.pid, args.idle_windows, args.idle_seconds)
                 for name, (proc, _, _) in started.items()}  # fmt: skip
        names = [s for s in setups if s in sides]
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                url, pid, side_key = sides[name]
                c0 = cpu_s(pid)
                events, ms = stream(url, args.tokens, side_key)
                runs[name].append({"cpu_us_per_event": (cpu_s(pid) - c0) * 1e6 / events,
                                   "ms_per_event": ms, "events": events})  # fmt: skip
                print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    finally:
        for p in relays:
            p.kill()
        for proc, _, _ in started.values():
            stop(proc)
    lines = [
        f"Front CPU per streamed token, `{args.profile}`, {args.tokens} tokens, "
        f"{args.rounds} rounds",
        "",
        "| setup | CPU per token event, us: median (min-max) | client ms per event |",
        "|---|---|---|",
    ]
    for name, got in runs.items():
        per_event = [g["cpu_us_per_event"] for g in got]
        client_ms = [g["ms_per_event"] for g in got]
        lines.append(f"| {name} | {median_spread(per_event)} | {median_spread(client_ms)} |")
    lines += ["", f"Idle ({args.idle_windows} x {args.idle_seconds:g} s):", ""]
    for name, windows in quiet.items():
        lines.append(
            f"- {name}: {median_spread([q['wakeups_per_s'] for q in windows])} wake-ups/s, "
            f"{median_spread([q['cpu_ms_per_s'] for q in windows])} ms CPU/s"
        )
    print("\n".join(lines))
    (args.out / "front_vs_relays.md").write_text("\n".join(lines) + "\n")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "idle": quiet, "runs": runs}
    (args.out / "front_vs_relays.json").write_text(json.dumps(record, indent=2))
    print(environment(), file=sys.stderr)


if __name__ == "__main__":
    main()
