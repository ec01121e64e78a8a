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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from inferd.errors import ConfigError, PortInUseError
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


async def _all_ready(models: list[ServedModel]) -> None:
    for m in models:
        await m.supervisor.ready.wait()


async def _watch(
    models: list[ServedModel],
    server: uvicorn.Server,
    outcome: Outcome,
    on_ready: Callable[[float], None],
    started: float,
) -> None:
    """Announce readiness once; stop the service if an engine fails for good."""
    ready = asyncio.create_task(_all_ready(models))
    failures = {asyncio.create_task(m.supervisor.failed.wait()): m for m in models}
    pending: set[asyncio.Task[Any]] = {ready, *failures}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                on_ready(time.monotonic() - started)
            failed = [m for t, m in failures.items() if t in done]
            if failed:
                for m in failed:
                    tail = "\n".join(list(m.supervisor.tail)[-25:])
                    log.error("engine for %s failed: %s\n%s", m.id, m.supervisor.last_error, tail)
                outcome.exit_code = 1
                server.should_exit = True
                return
    finally:
        for t in (ready, *failures):
            t.cancel()
        await asyncio.gather(ready, *failures, return_exceptions=True)


def run(
    app: FastAPI,
    sock: socket.socket,
    models: list[ServedModel],
    *,
    log_level: str,
    on_ready: Callable[[float], None],
    started: float,
) -> int:
    config = uvicorn.Config(
        app,
        log_config=None,  # inferd's own logging set-up applies
        log_level=log_level,
        access_log=False,  # the proxy logs each inference request itself, without prompts
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    outcome = Outcome()

    async def main() -> None:
        watcher = asyncio.create_task(_watch(models, server, outcome, on_ready, started))
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal with the
    # handler that was there before it started. A clean stop is a success (exit 0), so that
    # handler must do nothing; it is a Python handler, not SIG_IGN, because an ignored signal
    # would stay ignored in the engines started afterwards.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    asyncio.run(main())
    return outcome.exit_code


def _stopped(signum: int, frame: object) -> None:
    log.debug("stopped by signal %d", signum)
