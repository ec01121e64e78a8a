"""Run the front: serve with uvicorn on the socket bound first (`server.boot`), report
readiness, stop cleanly.

uvicorn turns SIGTERM and Ctrl-C into a graceful shutdown, whose
lifespan exit stops every engine. If an engine cannot start at all, the service exits with code 1
and the engine's last log lines instead of staying up unready forever.

Before the app sees a request (and so before its API key is checked), a client can only make the
front hold a connection and a header block: `GuardedHttpToolsProtocol` bounds both (open
connections, header bytes, header count, seconds to send the headers), so a slow or huge header
costs the sender, not the service. `InFlight` counts every HTTP request from its arrival, which is
what the drain waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import resource
import socket
import ssl as _ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, Protocol

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferd.config import Settings
from inferd.guardrails.rails import Guardrails
from inferd.server import boot
from inferd.server.errors import envelope, type_for
from inferd.server.proxy import Proxy
from inferd.server.served import ServedModel

log = logging.getLogger("inferd.server")


@dataclass
class Outcome:
    exit_code: int = 0


async def _all_ready(models: list[ServedModel], guards: Guardrails) -> None:
    for m in models:
        await m.supervisor.ready.wait()
    await guards.prepared.wait()


async def _all_failed(m: ServedModel) -> None:
    """Until every engine of the model has failed for good: with several (a combined profile),
    the ones left serve, and the one that failed is logged."""
    waits = {asyncio.ensure_future(b.supervisor.failed.wait()): b for b in m.backends}
    try:
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                for task in done:
                    sup = waits[task].supervisor
                    tail = "\n".join(list(sup.tail)[-25:])
                    log.error(
                        "the %s engine of %s failed (its other engines go on serving): %s\n%s",
                        sup.engine.name,
                        m.id,
                        sup.last_error,
                        tail,
                    )
    finally:
        for task in waits:
            task.cancel()


async def _watch(
    models: list[ServedModel],
    guards: Guardrails,
    server: uvicorn.Server,
    outcome: Outcome,
    on_ready: Callable[[float], None],
    started: float,
) -> None:
    """Announce readiness once; stop the service if an engine, or the preparation of its
    rails, fails for good."""
    ready = asyncio.create_task(_all_ready(models, guards))
    failures: dict[asyncio.Task[Any], ServedModel | None] = {
        asyncio.create_task(_all_failed(m)): m for m in models
    }
    failures[asyncio.create_task(guards.failed.wait())] = None
    pending: set[asyncio.Task[Any]] = {ready, *failures}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                on_ready(time.monotonic() - started)
            failed = [m for t, m in failures.items() if t in done]
            if failed:
                for m in failed:
                    if m is None:
                        log.error("guardrails %s", guards.state)
                        continue
                    sup = next(
                        (b.supervisor for b in m.backends if b.supervisor.failed.is_set()),
                        m.supervisor,
                    )
                    tail = "\n".join(list(sup.tail)[-25:])
                    log.error("engine for %s failed: %s\n%s", m.id, sup.last_error, tail)
                outcome.exit_code = 1
                server.should_exit = True
                return
    finally:
        for t in (ready, *failures):
            t.cancel()
        await asyncio.gather(ready, *failures, return_exceptions=True)


# ------------------------------------------------------------------ what a client may hold


@dataclass(frozen=True)
class ClientLimits:
    """What one client can make the front hold before the app sees its request."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ClientLimits:
        return cls(
            settings.max_header_bytes,
            settings.max_headers,
            settings.header_timeout_s,
            settings.max_connections,
        )


# A refused connection is answered, its writing side shut, and what the client still sends is
# read and dropped for this long before closing: closing on unread data would reset the
# connection, and the client could lose the answer. Short, so refused connections cannot pile up.
REFUSED_LINGER_S = 1.0


# Refusals are logged once per kind per this many seconds, with how many were not: a flood of
# refused clients must not become a flood of log lines.
REFUSAL_LOG_EVERY_S = 10.0
_refusals: dict[str, tuple[float, int]] = {}  # code -> (when last logged, refused since)


def _log_refusal(status: int, code: str, message: str) -> None:
    now = time.monotonic()
    logged, unlogged = _refusals.get(code, (-REFUSAL_LOG_EVERY_S, 0))
    if now - logged < REFUSAL_LOG_EVERY_S:
        _refusals[code] = (logged, unlogged + 1)
        return
    _refusals[code] = (now, 0)
    more = f"; {unlogged} more like it since the last report" if unlogged else ""
    log.warning("refused a client: %s (%d %s)%s", message, status, code, more)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the guard refuses."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (the one `uvicorn[standard]` runs), bounded: a connection
    beyond `max_connections` gets 503; a request whose header block exceeds `max_header_bytes`
    or `max_headers` gets 431; one whose headers take longer than `header_timeout_s` (counted
    from connecting, or from the first byte of a request on a kept-alive connection) gets 408.
    Each refusal closes the connection. uvicorn bounds none of these (`limit_concurrency` only
    swaps the app for a 503 once the headers are in, and counts the connection asking)."""

    limits: ClassVar[ClientLimits]  # set by `guarded_protocol`, one subclass per server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True  # the next bytes belong to a request's header block
        self._header_bytes = 0
        self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None  # what a parser callback refused
        self._discarding = False  # refused: input is read and dropped until the close

    # -- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._answer_and_close(
                503,
                "too_many_connections",
                f"the service has {self.limits.max_connections} connections open, its limit; "
                "retry later",
            )
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Header bytes are fed to the parser no further than the limit: past it the request is
        # refused, so no client can make the parser buffer more.
        while data and not self._discarding and not self.transport.is_closing():
            if not self._reading_headers:
                super().data_received(data)
                return
            self._start_header_timer()
            room = self.limits.max_header_bytes - self._header_bytes
            if room <= 0:
                self._answer_and_close(
                    431,
                    "headers_too_large",
                    f"request headers exceed the limit of {self.limits.max_header_bytes} bytes",
                )
                return
            head, data = data[:room], data[room:]
            self._header_bytes += len(head)
            super().data_received(head)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # the parser stopped because a callback refused
            self._answer_and_close(*self._refusal)
            return
        super().send_400_response(msg)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (
                431,
                "too_many_headers",
                f"the request has more than {self.limits.max_headers} headers",
            )
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows on the wire is the next request's header block (its timer starts with
        # its first byte: the client may rightly wait minutes for this answer first).
        self._reading_headers = True
        self._header_bytes = 0

    # -- refusals

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._headers_too_slow
            )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._answer_and_close(
            408,
            "header_timeout",
            f"request headers were not received within {self.limits.header_timeout_s:g} s",
        )

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        """Answer `status` in the OpenAI error envelope, then close the connection (after a
        short linger that reads and drops what the client still sends)."""
        self._stop_header_timer()
        self._unset_keepalive_if_required()
        self._discarding = True
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request went wrong while an answer is being written: no room for
            # another answer in it.
            self.transport.close()
            return
        _log_refusal(status, code, message)
        body = json.dumps(envelope(message, type_for(status), code)).encode()
        head = [STATUS_LINE[status]]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_S, self.transport.close)


def guarded_protocol(limits: ClientLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def _check_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: raise the soft limit toward the hard one if the
    connection cap (plus engine connections and files) would not fit, and say so if it cannot."""
    need = max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open files are limited to %d, fewer than max_connections (%d) needs; lower "
            "INFERD_MAX_CONNECTIONS or raise `ulimit -n`",
            soft,
            max_connections,
        )


# ------------------------------------------------------------------ requests in flight


class InFlight:
    """ASGI wrapper that counts HTTP requests from their arrival (headers read) until the app
    returns, i.e. until the last byte of the answer, streams included. The drain waits on it:
    a request still sending its body, in the input rails or queued for a slot is in flight,
    though the proxy has no `Call` for it yet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._ids = itertools.count()
        self._active: set[int] = set()
        self._finished = asyncio.Event()  # set whenever one finishes; cleared by the waiter

    @property
    def count(self) -> int:
        return len(self._active)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = next(self._ids)
        self._active.add(request)
        try:
            await self.app(scope, receive, send)
        finally:
            self._active.discard(request)
            self._finished.set()

    def mark(self) -> int:
        """A point in arrival order: every request that arrived before it has a lower id."""
        return next(self._ids)

    async def wait_before(self, mark: int, timeout_s: float) -> bool:
        """Wait, at most `timeout_s`, until every request that arrived before `mark` has
        finished (those arriving later, such as 503s during a drain, do not hold it up)."""

        async def settled() -> None:
            while any(r < mark for r in self._active):
                self._finished.clear()
                await self._finished.wait()

        try:
            await asyncio.wait_for(settled(), timeout_s)
        except TimeoutError:
            return False
        return True


class Closes(Protocol):
    """What refuses its waiters when the drain begins: each model's `Admission`, and the
    `ModelPool` (requests waiting for a model to load)."""

    def close(self, reason: str) -> None: ...


# How often the server's main loop renews the Date header (HTTP dates have one-second
# resolution) when nothing tells it to exit.
TICK_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before stopping (a second one stops now).

    Draining: readiness turns 503 and new requests get 503 at once, while the connection stays
    open (so load balancers see a clear answer, not a refused connection); requests queued for
    a slot get 503 at once too; every request that arrived before the signal (counted by
    `inflight` from its arrival, whatever it is doing) gets `drain_timeout_s` to finish; then the
    engine connections still open are cut, which ends each stream with an SSE error event. Then
    the usual shutdown stops the engines.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        proxy: Proxy,
        drain_timeout_s: float,
        *,
        inflight: InFlight | None = None,
        admissions: Iterable[Closes] = (),
    ) -> None:
        self._exit_now = asyncio.Event()  # set with `should_exit`: the main loop ends at once
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(config)
        self.proxy = proxy
        self.drain_timeout_s = drain_timeout_s
        self.inflight = inflight
        self.admissions = list(admissions)
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    # uvicorn's main loop wakes every 0.1 s to read `should_exit` (and renews the Date header
    # every tenth time). Each wake-up of the front is CPU taken from the engine's threads, which
    # hold every core while they decode: with the engine supervisors' exit polls, the idle
    # front woke 15 times a second (2.0 ms of CPU a second on a 2-core Xeon VM; once, and 0.8
    # ms, since: benchmarks/RESULTS.md, "The front's cost on llama.cpp on the Xeon"). So: once
    # a second for the Date header, and at once when `should_exit` is set.

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._loop is not None and not self._loop.is_closed():
            # Set from a signal handler too (uvicorn's `handle_exit`): only this call is safe
            # there.
            self._loop.call_soon_threadsafe(self._exit_now.set)

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # tick 0: the Date header is renewed every time
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._exit_now.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or not serving yet: stop now
            return
        self._signalled = True
        log.info("signal %d: draining (up to %g s), then stopping", sig, self.drain_timeout_s)
        # Signal handlers run between bytecodes of the loop's thread; call_soon_threadsafe is
        # the safe way in from there (and from any other thread, such as a test's).
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        self.proxy.draining = True  # new requests and readiness: 503 from now on
        reason = "the service is shutting down; retry on another replica"
        for admission in self.admissions:
            admission.close(reason)  # nothing queued gets a slot (or a model load): a slot
            # handed on would start work the drain then cuts, and an empty set of calls would
            # end it early
        if self.inflight is None:
            cut = await self.proxy.drain(self.drain_timeout_s)
        else:
            await self.inflight.wait_before(self.inflight.mark(), self.drain_timeout_s)
            cut = await self.proxy.drain(0)  # the deadline has passed: cut what is left
        if cut:
            log.warning("drain timeout: %d request(s) cut short", cut)
        self.should_exit = True


def make_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """uvicorn configured from the settings (TLS, logging, client limits), draining on SIGTERM."""
    ssl: dict[str, Any] = {}
    if settings.ssl_mode != "disabled":
        ssl = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)}
        if settings.ssl_ca_certs:
            ssl["ssl_ca_certs"] = str(settings.ssl_ca_certs)
        if settings.ssl_mode == "mtls":
            ssl["ssl_cert_reqs"] = _ssl.CERT_REQUIRED
    _check_fd_limit(settings.max_connections)
    inflight = InFlight(app)
    config = uvicorn.Config(
        inflight,
        http=guarded_protocol(ClientLimits.of(settings)),
        log_config=None,  # inferd's own logging set-up applies
        log_level=settings.log_level,
        access_log=False,  # the proxy logs each inference request itself, without prompts
        lifespan="on",
        timeout_graceful_shutdown=10,  # after the drain, only stragglers are left
        # uvicorn's 5 s default is shorter than common client pools keep connections (aiohttp
        # 15 s, load balancers 60 s): a request sent as the server closes the idle connection
        # fails with "server disconnected". Seen in benchmarks; the server must outlast them.
        timeout_keep_alive=int(settings.keep_alive_s),
        **ssl,
    )
    return DrainingServer(
        config,
        app.state.proxy,
        settings.drain_timeout_s,
        inflight=inflight,
        admissions=[
            *(m.admission for m in app.state.models),
            *([app.state.pool] if app.state.pool is not None else []),
        ],
    )


async def serve(
    app: FastAPI,
    sock: socket.socket,
    models: list[ServedModel],
    settings: Settings,
    *,
    on_ready: Callable[[float], None],
    started: float,
) -> int:
    """Serve `app` on `sock` until stopped; the exit code. Runs on the loop that started the
    engines (`server.boot.run`)."""
    server = make_server(app, settings)
    outcome = Outcome()
    # With models on demand, only the pinned ones start now: the rest fail (if they do) on
    # their own request, not the service.
    watched = [m for m in models if not m.on_demand]
    watcher = asyncio.create_task(
        _watch(watched, app.state.guards, server, outcome, on_ready, started)
    )
    # uvicorn re-raises the stopping signal, after shutdown, with the handler that was there
    # before it started. A clean stop is a success (exit 0), so that handler must do nothing;
    # it is a Python handler, not SIG_IGN, because an ignored signal would stay ignored in the
    # engines started afterwards.
    boot.quiet_stop_signals()
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return outcome.exit_code
