"""Run the front: bind the listen socket, serve with uvicorn, report readiness, stop cleanly.

The socket is bound before any slow work (model preparation, engine start) so that "port in use"
is a clear error at once, and it is handed to uvicorn as is, so nothing can take the port between
the check and the serving. uvicorn turns SIGTERM and Ctrl-C into a graceful shutdown, whose
lifespan exit stops every engine. If an engine cannot start at all, the service exits with code 1
and the engine's last log lines instead of staying up unready forever.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl as _ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from inferd.config import Settings
from inferd.errors import ConfigError, PortInUseError
from inferd.guardrails.rails import Guardrails
from inferd.server.proxy import Proxy
from inferd.server.served import ServedModel

log = logging.getLogger("inferd.server")


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is in use; choose another with --port or INFERD_PORT"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class Outcome:
    exit_code: int = 0


async def _all_ready(models: list[ServedModel], guards: Guardrails) -> None:
    for m in models:
        await m.supervisor.ready.wait()
    await guards.prepared.wait()


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
        asyncio.create_task(m.supervisor.failed.wait()): m for m in models
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
                    tail = "\n".join(list(m.supervisor.tail)[-25:])
                    log.error("engine for %s failed: %s\n%s", m.id, m.supervisor.last_error, tail)
                outcome.exit_code = 1
                server.should_exit = True
                return
    finally:
        for t in (ready, *failures):
            t.cancel()
        await asyncio.gather(ready, *failures, return_exceptions=True)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before stopping (a second one stops now).

    Draining: readiness turns 503 and new requests get 503 at once, while the connection stays
    open (so load balancers see a clear answer, not a refused connection); requests in flight
    get `drain_timeout_s` to finish; then the engine connections still open are cut, which ends
    each stream with an SSE error event. Then the usual shutdown stops the engines.
    """

    def __init__(self, config: uvicorn.Config, proxy: Proxy, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.proxy = proxy
        self.drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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
        cut = await self.proxy.drain(self.drain_timeout_s)
        if cut:
            log.warning("drain timeout: %d request(s) cut short", cut)
        self.should_exit = True


def make_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """uvicorn configured from the settings (TLS, logging), draining on SIGTERM."""
    ssl: dict[str, Any] = {}
    if settings.ssl_mode != "disabled":
        ssl = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)}
        if settings.ssl_ca_certs:
            ssl["ssl_ca_certs"] = str(settings.ssl_ca_certs)
        if settings.ssl_mode == "mtls":
            ssl["ssl_cert_reqs"] = _ssl.CERT_REQUIRED
    config = uvicorn.Config(
        app,
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
    return DrainingServer(config, app.state.proxy, settings.drain_timeout_s)


def run(
    app: FastAPI,
    sock: socket.socket,
    models: list[ServedModel],
    settings: Settings,
    *,
    on_ready: Callable[[float], None],
    started: float,
) -> int:
    server = make_server(app, settings)
    outcome = Outcome()

    async def main() -> None:
        watcher = asyncio.create_task(
            _watch(models, app.state.guards, server, outcome, on_ready, started)
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    # uvicorn re-raises the stopping signal, after shutdown, with the handler that was there
    # before it started. A clean stop is a success (exit 0), so that handler must do nothing;
    # it is a Python handler, not SIG_IGN, because an ignored signal would stay ignored in the
    # engines started afterwards.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    # uvicorn's loop choice (`auto`: uvloop where installed, as uvicorn[standard] does on
    # Linux): the relay's per-token work is mostly event-loop and socket work, and with uvloop it
    # costs about half the CPU, which on a small machine is taken from the engine's threads.
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(main())
    return outcome.exit_code


def _stopped(signum: int, frame: object) -> None:
    log.debug("stopped by signal %d", signum)
