"""Start `inferd serve`'s engines before its front: bind the port, start the engines, then import
and build the web stack while they load.

An engine takes a second or more to load its model (llama-server; vLLM minutes), and the front's
web stack (FastAPI, uvicorn, aiohttp, the API modules) takes about as long to import. Run one
after the other, the service is ready after both; started first, the engines load while the
front is built, and the service is ready when the slower of the two is. This module therefore
imports nothing of the web stack: `inferd serve` imports it, starts the engines from it
(`run`), and only then imports the rest (`server.runtime`, `server.app`).

The listen socket is bound before any slow work (model preparation, engine start) so that "port
in use" is a clear error at once, and it is handed to uvicorn as is, so nothing can take the
port between the check and the serving.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType

from inferd.errors import ConfigError, PortInUseError
from inferd.server.supervisor import Supervisor

# How long `run` waits for the engines' processes to exist before it builds the front anyway.
SPAWN_WAIT_S = 5.0


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


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed, as uvicorn's `loop="auto"` chooses (uvicorn[standard] installs
    it on Linux): the relay's per-token work is mostly event-loop and socket work, and with
    uvloop it costs about half the CPU, which on a small machine is taken from the engine's
    threads. The loop is made here, before uvicorn is imported, because the engines' processes
    belong to the loop that starts them."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(engines: Sequence[Supervisor], front: Callable[[], Awaitable[int]]) -> int:
    """Start `engines`, then run `front()` (which imports and serves the front) on the same
    loop; its exit code. If the front cannot be built, the engines are stopped again."""

    async def main() -> int:
        for supervisor in engines:
            supervisor.start()
        await _spawned(engines)
        try:
            return await front()
        except BaseException:
            await asyncio.gather(*(s.stop() for s in engines), return_exceptions=True)
            raise

    # uvicorn re-raises the stopping signal, after shutdown, with the handler that was there
    # before it started. A clean stop is a success (exit 0), so that handler must do nothing
    # (`server.runtime.serve` sets it just before uvicorn starts). Until then SIGTERM
    # interrupts like Ctrl-C, as it does the preparation before this.
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())


async def _spawned(engines: Sequence[Supervisor]) -> None:
    """Until each start has its process (a few loop turns), so that the engines load while the
    front's imports hold the loop."""
    waits = [asyncio.ensure_future(s.spawned.wait()) for s in engines]
    if not waits:
        return
    try:
        await asyncio.wait(waits, timeout=SPAWN_WAIT_S)
    finally:
        for wait in waits:
            wait.cancel()


def stopped(signum: int, frame: FrameType | None) -> None:
    """The handler uvicorn finds, and re-raises its stopping signal with: nothing to do."""


def quiet_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)
