"""Start an engine process, wait until it answers, restart it with back-off, stop it cleanly.

One `Supervisor` per served model. The engine runs in its own session (process group) through
`inferd.engines.launch`, so a stop can signal the engine and every process it spawned at once, and
the kernel kills it if inferd itself dies. Readiness is the engine's health route answering 200.

States: starting -> ready; ready -> restarting (the process exited) -> starting ...; a stop leads to
stopped. An engine that fails `MAX_START_FAILURES` times in a row without ever becoming ready
goes to failed and `failed` is set: the serve loop then exits with the engine's last log lines,
rather than restarting forever something that cannot start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import secrets
import signal
import socket
import sys
import time

import aiohttp
import psutil

from inferd.engines.base import Engine
from inferd.errors import EngineStartError

log = logging.getLogger("inferd.supervisor")

MAX_START_FAILURES = 3
# Exponential back-off between restarts of a failing engine, capped at 30 s. An engine that
# stayed up STABLE_S before crashing starts the sequence over.
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 300.0
HEALTH_POLL_S = 0.5
EXIT_POLL_S = 0.2
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 200
# Engine output is read in chunks of READ_CHUNK bytes whatever its line length, and each line is
# kept (logged, put in the tail) up to MAX_LINE_BYTES; the rest of a longer line is counted and
# dropped. A reader that waits for a newline can be made to buffer without bound, or to give up
# (asyncio's readline raises past its limit): then nobody reads the pipe, it fills, and the
# engine blocks on its next write while its health route still answers. llama.cpp echoes a bad
# grammar back in full, and vLLM dumps its whole config on one line.
READ_CHUNK = 64 * 1024
MAX_LINE_BYTES = 16 * 1024
# Engine output lines that are worth a warning even when the engine's chatter is at debug level.
_LOUD = (" ERROR ", " CRITICAL ", "Traceback (most recent call last)")


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    SUSPECT = "suspect"  # a request just failed to reach it: not ready until it answers again
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` or one of its descendants listens on TCP `port`."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False


def other_listeners(pid: int, port: int) -> list[int | None]:
    """Processes outside `pid`'s tree that listen on TCP `port` too (SO_REUSEPORT lets a
    process of the same user share a port the engine listens on). None: a socket of another
    user, whose process cannot be seen."""
    try:
        root = psutil.Process(pid)
        tree = {pid, *(p.pid for p in root.children(recursive=True))}
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [
        c.pid
        for c in conns
        if c.status == psutil.CONN_LISTEN
        and getattr(c.laddr, "port", None) == port
        and c.pid not in tree
    ]


def port_taken(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port. A bare connection, closed unused:
    nothing is sent (and a probe by bind could take the port from the engine's own bind)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class _LineCutter:
    """Splits a byte stream into lines of at most `limit` bytes; a longer line keeps its first
    `limit` bytes and says how many were cut."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept = bytearray()  # the current line, up to `limit` bytes
        self._dropped = 0  # bytes of the current line beyond `limit`

    def feed(self, chunk: bytes) -> list[str]:
        lines = []
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            self._keep(piece)
            lines.append(self._take())
        self._keep(rest)
        return lines

    def flush(self) -> str | None:
        """The last line, when the output ended without a newline."""
        return self._take() if self._kept or self._dropped else None

    def _keep(self, piece: bytes) -> None:
        room = self.limit - len(self._kept)
        self._kept += piece[:room]
        self._dropped += max(0, len(piece) - room)

    def _take(self) -> str:
        line = self._kept.decode("utf-8", "replace").rstrip()
        if self._dropped:
            line += f" [... line cut: {self._dropped} more bytes]"
        self._kept.clear()
        self._dropped = 0
        return line


class Supervisor:
    def __init__(
        self,
        engine: Engine,
        *,
        ready_timeout_s: float,
        host: str = "127.0.0.1",
        backoff_s: tuple[float, ...] = BACKOFF_S,
    ) -> None:
        self.engine = engine
        self.backoff_s = backoff_s
        self.ready_timeout_s = ready_timeout_s
        self.host = host
        self.port = 0
        self.state = State.STOPPED
        self.last_error: str | None = None
        self.restarts = 0
        self.engine_version: str | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        # The key the running engine requires, new at every start (see `Engine.secret_env`).
        self._secret = ""
        self._task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession
        self._stopping = False
        self._log = logging.getLogger(f"inferd.engine.{engine.served_name}")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def auth_headers(self) -> dict[str, str]:
        """The header every request to the engine carries: the key of its current start."""
        return {"Authorization": f"Bearer {self._secret}"}

    def start(self, session: aiohttp.ClientSession) -> None:
        self.started_at = time.monotonic()
        self._session = session
        self._task = asyncio.create_task(
            self._run(session), name=f"supervise {self.engine.served_name}"
        )

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.port = free_port(self.host)
        self._secret = secrets.token_urlsafe(32)
        cmd = self.engine.command(self.host, self.port)
        argv = [sys.executable, "-m", "inferd.engines.launch", str(os.getpid()), "--", *cmd.argv]
        log.info(
            "starting %s engine for %s on port %d",
            self.engine.name,
            self.engine.served_name,
            self.port,
        )
        log.debug("engine command: %s", " ".join(cmd.argv))
        return await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **cmd.env, **self.engine.secret_env(self._secret)},
            start_new_session=True,
            limit=2 * READ_CHUNK,  # how much asyncio buffers before it stops reading the pipe
        )

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        """Log the engine's output until it closes, a line at a time, in bounded memory."""
        assert proc.stdout is not None
        lines = _LineCutter(MAX_LINE_BYTES)
        while chunk := await proc.stdout.read(READ_CHUNK):
            for line in lines.feed(chunk):
                self._log_line(line)
        if (last := lines.flush()) is not None:
            self._log_line(last)

    def _log_line(self, line: str) -> None:
        self.tail.append(line)
        level = logging.WARNING if any(w in line for w in _LOUD) else logging.DEBUG
        self._log.log(level, "%s", line)

    async def _wait_ready(
        self, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession
    ) -> None:
        """Until the engine's health route answers 200. The port was free when picked, but
        another local process can take it before the engine binds it: the health route is
        asked only once the engine's own process tree listens there, and a port held by
        anyone else fails the start before any request (or the key) goes to it. A port shared
        with another process (SO_REUSEPORT: same user only) fails it once health answers."""
        deadline = time.monotonic() + self.ready_timeout_s
        url = self.base_url + self.engine.health_path
        foreign = 0  # polls in a row that found the port held, not by the engine
        while time.monotonic() < deadline:
            ours = await asyncio.to_thread(listens, proc.pid, self.port)
            if not ours and await asyncio.to_thread(port_taken, self.host, self.port):
                # Twice in a row: the engine may have begun to listen between the two checks.
                foreign += 1
                if foreign >= 2 or proc.returncode is not None:
                    raise EngineStartError(
                        f"port {self.port} is held by another process, not by the engine "
                        f"started (pid {proc.pid}); refusing to send it requests"
                    )
            else:
                foreign = 0
            if proc.returncode is not None:
                raise EngineStartError(
                    f"engine exited with code {proc.returncode} before it was ready"
                )
            if ours:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(
                        url, headers=self.auth_headers(), timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        if resp.status == 200:
                            break
            await asyncio.sleep(HEALTH_POLL_S)
        else:
            raise EngineStartError(f"engine was not ready after {self.ready_timeout_s:g} s")
        others = await asyncio.to_thread(other_listeners, proc.pid, self.port)
        if others:
            raise EngineStartError(
                f"port {self.port} is shared with another process (pid "
                f"{', '.join(str(p) if p else 'unknown' for p in others)}), not only the engine "
                f"started (pid {proc.pid}); refusing to send it requests"
            )

    async def _read_version(self, session: aiohttp.ClientSession) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with session.get(
                self.base_url + self.engine.version_path,
                headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=2),
            ) as resp:
                if resp.status == 200:
                    self.engine_version = self.engine.parse_version(
                        await resp.json(content_type=None)
                    )

    async def _run(self, session: aiohttp.ClientSession) -> None:
        try:
            await self._supervise(session)
        except Exception as exc:  # e.g. the engine's executable is missing: fail loudly, once
            log.exception("supervising the %s engine failed", self.engine.name)
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.state = State.FAILED
            self.failed.set()

    async def _supervise(self, session: aiohttp.ClientSession) -> None:
        failures = 0  # failed starts in a row
        crashes = 0  # crashes in a row of an engine that had been up less than STABLE_S
        ever_ready = False
        while not self._stopping:
            self.state = State.STARTING if not ever_ready else State.RESTARTING
            begun = time.monotonic()
            proc = self._proc = await self._spawn()
            pump = asyncio.create_task(self._pump_output(proc))
            try:
                await self._wait_ready(proc, session)
            except EngineStartError as exc:
                failures += 1
                self.last_error = str(exc)
                log.error("%s engine for %s: %s", self.engine.name, self.engine.served_name, exc)
                await self._terminate(proc)
                await pump
                if not ever_ready and failures >= MAX_START_FAILURES:
                    self.state = State.FAILED
                    self.failed.set()
                    return
                await self._backoff(failures)
                continue
            failures = 0
            ever_ready = True
            self.ready_seconds = time.monotonic() - begun
            await self._read_version(session)
            self.state = State.READY
            self.ready.set()
            up_since = time.monotonic()
            code = await self._exited(proc)
            self.ready.clear()
            # The engine's own children (vLLM's engine core) may outlive it: clear the group.
            self._kill_group(proc.pid, signal.SIGKILL)
            await pump
            if self._stopping:
                break
            self.restarts += 1
            crashes = crashes + 1 if time.monotonic() - up_since < STABLE_S else 1
            self.last_error = f"engine exited with code {code} (restart {self.restarts})"
            delay = self.backoff_s[min(crashes, len(self.backoff_s)) - 1]
            log.error(
                "%s engine for %s exited with code %s; restarting in %g s (restart %d)",
                self.engine.name,
                self.engine.served_name,
                code,
                delay,
                self.restarts,
            )
            await self._backoff(crashes)
        self.state = State.STOPPED

    def report_failure(self, reason: str) -> None:
        """A request could not reach the engine: stop calling it ready at once, and look.

        Noticing the process's exit takes a moment (and a hung engine does not exit at all);
        readiness must not say 200 in between. If the engine answers its health check, it is
        ready again; if it has died, the supervision loop restarts it."""
        if self.state is not State.READY:
            return
        self.state = State.SUSPECT
        self.ready.clear()
        self.last_error = reason
        self._recheck_task = asyncio.get_running_loop().create_task(self._recheck())

    async def _recheck(self) -> None:
        healthy = False
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._session.get(
                self.base_url + self.engine.health_path,
                headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                healthy = resp.status == 200
        alive = self._proc is not None and self._proc.returncode is None
        if healthy and alive and self.state is State.SUSPECT:
            self.state = State.READY
            self.ready.set()

    @staticmethod
    async def _exited(proc: asyncio.subprocess.Process) -> int:
        """The engine's exit code, as soon as it exits. Not `proc.wait()`: asyncio only returns
        from that once the output pipe closes too, and the engine's own children (vLLM's engine
        core) hold it open after the engine itself has died."""
        while proc.returncode is None:  # noqa: ASYNC110 (no event fires before the pipe closes)
            await asyncio.sleep(EXIT_POLL_S)
        return proc.returncode

    async def _backoff(self, attempt: int) -> None:
        self.state = State.RESTARTING
        await asyncio.sleep(self.backoff_s[min(attempt, len(self.backoff_s)) - 1])

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the engine's whole process group, SIGKILL after a grace period."""
        if proc.returncode is not None:
            self._kill_group(proc.pid, signal.SIGKILL)  # stragglers of a dead leader
            return
        self._kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("engine did not stop within %g s; killing it", STOP_GRACE_S)
        self._kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    @staticmethod
    def _kill_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    async def stop(self) -> None:
        self._stopping = True
        self.ready.clear()
        if self._proc is not None:
            await self._terminate(self._proc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = State.STOPPED

    def describe(self) -> dict[str, object]:
        """The state `/v1/health/ready` shows for this engine."""
        return {
            "state": self.state.value,
            "engine": self.engine.name,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "seconds_since_start": round(time.monotonic() - self.started_at, 1)
            if self.started_at
            else None,
        }
