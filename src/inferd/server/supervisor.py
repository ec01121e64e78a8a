"""Start an engine process, wait until it answers, restart it with back-off, stop it cleanly.

One `Supervisor` per served model. The engine runs in its own session (process group) through
`inferd.engines.launch`, so a stop can signal the engine and every process it spawned at once, and
the kernel kills it if inferd itself dies. The engine listens on a Unix socket, new at each start,
in a private folder of this supervisor (`server.engine_link`); once its own process tree holds
that socket, the supervisor's `EngineLink` reaches it there (every request to the engine goes
through `link`), and readiness is its health route answering 200 (then, for an engine whose
first request is slower than the next, one warm-up request: `Engine.warmup`).

States: starting -> ready; ready -> restarting (the process exited) -> starting ...; a stop leads to
stopped. A later engine of a combined profile may be preparing before its first start, while its
model is built (`preparation`). An engine that fails `MAX_START_FAILURES` times in a row without
ever becoming ready goes to failed and `failed` is set: the serve loop then exits with the
engine's last log lines, rather than restarting forever something that cannot start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from inferd.engines import launch
from inferd.engines.base import Engine
from inferd.errors import EngineStartError
from inferd.server.engine_link import EngineLink, RuntimeFolder, listening

log = logging.getLogger("inferd.supervisor")

MAX_START_FAILURES = 3
# Exponential back-off between restarts of a failing engine, capped at 30 s. An engine that
# stayed up STABLE_S before crashing starts the sequence over.
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 300.0
HEALTH_POLL_S = 0.5
# A start is polled from this interval up, doubling to HEALTH_POLL_S: llama-server is often ready
# within a second, and a fixed half-second poll added a quarter of a second to it on average.
FIRST_POLL_S = 0.05
# Where the kernel has no process handles (pidfd, Linux 5.3+), a running engine's exit is
# polled this often; with one, nothing polls while it runs (`Supervisor._exited`).
EXIT_POLL_S = 0.2
# Between an exit and asyncio's reaping of the process (its return code).
REAP_POLL_S = 0.01
STOP_GRACE_S = 10.0
# The most a warm-up request (`Engine.warmup`) may take before the engine is called ready anyway.
WARMUP_LIMIT_S = 30.0
# How long a ready engine started behind another waits, idle, before it is stopped until it has
# work again (`Supervisor.rest`): a crowd's requests come and go within a second, and each stop
# and continue signals every process of the engine.
REST_AFTER_S = 1.0
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
    # Its model is being built before its first start (a combined profile's later engine from
    # an empty cache: `preparation`).
    PREPARING = "preparing"
    STARTING = "starting"
    READY = "ready"
    SUSPECT = "suspect"  # a request just failed to reach it: not ready until it answers again
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


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


def _pidfd(pid: int) -> int | None:
    """A handle on process `pid` that turns readable when it exits; None where the kernel or
    Python has none (not Linux, or before 5.3), or the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _threads_of_group(pgid: int) -> list[int]:
    """The thread ids of every process in process group `pgid` (the engine's group)."""
    tids: list[int] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                tids.extend(t.id for t in proc.threads())
    return tids


class Supervisor:
    def __init__(
        self,
        engine: Engine,
        *,
        ready_timeout_s: float,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        nice: int = 0,
    ) -> None:
        self.engine = engine
        # Lower CPU priority while the engine starts (one that starts behind an engine already
        # serving: a combined profile's second engine compiles without slowing the first's
        # users); given back once it is ready, where the system allows (`_unnice`).
        self.nice = nice
        # A start behind another engine may be paused (SIGSTOP to its group) while the first
        # engine's users need the cores (`pause`, `server.warmup`); the time paused does not
        # count against the start's deadline.
        self._hold = False  # paused wanted (`pause`)
        self._paused_at: float | None = None  # when the running start was stopped
        self.paused_s = 0.0
        # Once ready, such an engine is stopped while it has nothing to do (`rest`), and
        # continued for its requests and for the front's own asks (`awake`).
        self._rest = False  # it has nothing to do (`rest`)
        self._users = 0  # the front's own asks in flight (`awake`)
        self._rest_timer: asyncio.TimerHandle | None = None
        self._parked_at: float | None = None  # when the ready engine was stopped
        # The child process building the model before the first start, if one runs
        # (`preparation`): lowered and paused as the start is.
        self._preparer: psutil.Process | None = None
        self.parked_s = 0.0
        self.parks = 0
        # Called each time the engine becomes ready (admission hands out the new engine's slots).
        self.on_ready: list[Callable[[], None]] = []
        self.backoff_s = backoff_s
        self.ready_timeout_s = ready_timeout_s
        # The current start's socket, and the pools to it once the engine holds it.
        self.socket: Path | None = None
        self.link: EngineLink | None = None
        self._folder: RuntimeFolder | None = None  # made at a first start, removed at stop
        self._starts = 0
        self.state = State.STOPPED
        self.last_error: str | None = None
        self.restarts = 0
        self.engine_version: str | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        # Set once a start has its process (or has failed before one could run): the engine
        # is loading from then on, whatever the event loop does (`server.boot`).
        self.spawned = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        # The key the running engine requires, new at every start (see `Engine.secret_env`).
        self._secret = ""
        self._task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._log = logging.getLogger(f"inferd.engine.{engine.served_name}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def auth_headers(self) -> dict[str, str]:
        """The header every request to the engine carries: the key of its current start."""
        return {"Authorization": f"Bearer {self._secret}"}

    @property
    def stopping(self) -> bool:
        """Told to stop (`stop`) and not started (or told a start is coming: `expect`) since."""
        return self._stopping

    def expect(self) -> None:
        """A start is coming: `ServedModel.join` starts a combined profile's later engine once
        the first answers and the model is checked. A stop from now on gives that start up; a
        stop before it (the model's last unload, on demand) does not."""
        self._stopping = False

    @property
    def started(self) -> bool:
        """Started and not stopped since: `inferd serve` starts its engines before the front's
        lifespan would (`server.boot`), which then leaves them be."""
        return self._task is not None

    def start(self) -> None:
        # A stopped supervisor may be started again (models on demand: `server.loading`).
        self._stopping = False
        self.failed.clear()
        self.spawned.clear()
        self.started_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"supervise {self.engine.served_name}")

    async def fetch(
        self, path: str, *, limit_s: float = 2.0, body: dict[str, Any] | None = None
    ) -> tuple[int, bytes] | None:
        """GET `path` from the engine's current start (POST `body` as JSON, when given), with
        its key: (status, answer), or None when it cannot be reached. For the front's own small
        asks (health, version, metrics, the warm-up)."""
        import aiohttp  # with the first link, not the module (see `engine_link.EngineLink`)

        link = self.link
        if link is None:
            return None
        with self.awake(), contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with link.pool.request(
                "GET" if body is None else "POST",
                link.url(path),
                json=body,
                headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=limit_s),
            ) as resp:
                return resp.status, await resp.read()
        return None

    async def _spawn(self) -> asyncio.subprocess.Process:
        if self._folder is None:
            self._folder = RuntimeFolder.create(self.engine.served_name)
        self._folder.clear()
        self._starts += 1
        self.socket = self._folder.socket(self._starts)
        self._secret = secrets.token_urlsafe(32)
        cmd = self.engine.command(self.socket)
        niced = [str(self.nice)] if self.nice else []
        # The shim is run as a file, not with `-m`: that would import the packages around it
        # (inferd.engines: the catalog's schema, pydantic), a third of a second of every start.
        # `-S -P`: nothing but the standard library on its path, which is all it needs.
        argv = [
            sys.executable,
            "-S",
            "-P",
            launch.__file__,
            str(os.getpid()),
            *niced,
            "--",
            *cmd.argv,
        ]
        log.info(
            "starting %s engine for %s on %s",
            self.engine.name,
            self.engine.served_name,
            self.socket,
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
        # What an engine prints while inferd stops it (vLLM's server reports its engine core's
        # end as an error with a traceback) is the stop, not a fault: kept for debug only.
        loud = not self._stopping and any(w in line for w in _LOUD)
        level = logging.WARNING if loud else logging.DEBUG
        self._log.log(level, "%s", line)

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        """Until the engine's health route answers 200. Nothing (not even the key) is sent
        before the engine's own process tree holds this start's socket in the private folder;
        a file there that is not that socket fails the start (`engine_link.listening`)."""
        assert self._folder is not None and self.socket is not None
        deadline = time.monotonic() + self.ready_timeout_s
        paused_before = self._paused_total()
        poll = FIRST_POLL_S
        while time.monotonic() < deadline + self._paused_total() - paused_before:
            if self._paused_at is not None:
                await asyncio.sleep(HEALTH_POLL_S)  # a stopped engine answers nothing
                continue
            if proc.returncode is not None:
                raise EngineStartError(
                    f"engine exited with code {proc.returncode} before it was ready"
                )
            if self.link is None and await asyncio.to_thread(
                listening, self.socket, self._folder, proc.pid
            ):
                self.link = EngineLink(self.socket)
            answer = await self.fetch(self.engine.health_path)
            if answer is not None and answer[0] == 200:
                return
            await asyncio.sleep(poll)
            poll = min(poll * 2, HEALTH_POLL_S)
        raise EngineStartError(f"engine was not ready after {self.ready_timeout_s:g} s")

    async def _read_version(self) -> None:
        answer = await self.fetch(self.engine.version_path)
        if answer is not None and answer[0] == 200:
            with contextlib.suppress(ValueError, AttributeError):
                self.engine_version = self.engine.parse_version(json.loads(answer[1]))

    async def _warm_up(self) -> None:
        """The engine's warm-up request (`Engine.warmup`), before it is called ready; not for an
        engine started behind another (it may be paused meanwhile, and takes only crowds). A
        warm-up that fails is logged and the engine is ready anyway: it answered its health
        route, and the first user's request will say what is wrong."""
        request = self.engine.warmup
        if request is None or self.nice:
            return
        path, body = request
        began = time.monotonic()
        answer = await self.fetch(path, body=body, limit_s=WARMUP_LIMIT_S)
        if answer is None:
            log.info("%s engine's warm-up request got no answer", self.engine.name)
            return
        log.debug(
            "%s engine warmed up: %s %d in %.0f ms",
            self.engine.name,
            path,
            answer[0],
            (time.monotonic() - began) * 1000,
        )

    async def _unlink(self) -> None:
        """Close the pools to an engine start that has ended."""
        link, self.link = self.link, None
        if link is not None:
            await link.close()

    async def _run(self) -> None:
        try:
            await self._supervise()
        except Exception as exc:  # e.g. the engine's executable is missing: fail loudly, once
            log.exception("supervising the %s engine failed", self.engine.name)
            self._failed_for_good(f"{type(exc).__name__}: {exc}")

    async def _supervise(self) -> None:
        failures = 0  # failed starts in a row
        crashes = 0  # crashes in a row of an engine that had been up less than STABLE_S
        ever_ready = False
        while not self._stopping:
            self.state = State.STARTING if not ever_ready else State.RESTARTING
            self._continue_start()  # a stop belongs to one process (a crash may have ended it)
            begun = time.monotonic()
            proc = self._proc = await self._spawn()
            self.spawned.set()
            if self._hold:
                self._stop_start()
            pump = asyncio.create_task(self._pump_output(proc))
            try:
                await self._wait_ready(proc)
            except EngineStartError as exc:
                failures += 1
                self.last_error = str(exc)
                log.error("%s engine for %s: %s", self.engine.name, self.engine.served_name, exc)
                await self._terminate(proc)
                await self._unlink()
                await pump
                if not ever_ready and failures >= MAX_START_FAILURES:
                    self.state = State.FAILED
                    self.failed.set()
                    return
                await self._backoff(failures)
                continue
            failures = 0
            ever_ready = True
            await self._read_version()
            await self._warm_up()
            self.ready_seconds = time.monotonic() - begun
            self._unnice(proc.pid)
            self._became_ready()
            up_since = time.monotonic()
            code = await self._exited(proc)
            self.ready.clear()
            self.state = State.RESTARTING
            self._settle()  # nothing left to stop or continue
            # The engine's own children (vLLM's engine core) may outlive it: clear the group.
            self._kill_group(proc.pid, signal.SIGKILL)
            await self._unlink()
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

    def fail(self, reason: str) -> None:
        """Failed without a start: what it needed before one could not be had (`reason`)."""
        log.error("%s engine for %s: %s", self.engine.name, self.engine.served_name, reason)
        self._failed_for_good(reason)

    def _failed_for_good(self, reason: str) -> None:
        self.last_error = reason
        self.state = State.FAILED
        self.failed.set()
        self.spawned.set()  # no process is coming: nobody waits for one

    def report_failure(self, reason: str) -> None:
        """A request could not reach the engine: stop calling it ready at once, and look.

        Noticing the process's exit takes a moment (and a hung engine does not exit at all);
        readiness must not say 200 in between. If the engine answers its health check, it is
        ready again; if it has died, the supervision loop restarts it."""
        if self.state is not State.READY:
            return
        self.state = State.SUSPECT
        self._settle()  # a stopped engine cannot show it is healthy
        self.ready.clear()
        self.last_error = reason
        self._recheck_task = asyncio.get_running_loop().create_task(self._recheck())

    async def _recheck(self) -> None:
        answer = await self.fetch(self.engine.health_path, limit_s=5)
        healthy = answer is not None and answer[0] == 200
        alive = self._proc is not None and self._proc.returncode is None
        if healthy and alive and self.state is State.SUSPECT:
            self._became_ready()

    def _became_ready(self) -> None:
        self.state = State.READY
        self._settle()
        self.ready.set()
        for callback in self.on_ready:
            callback()

    def _paused_total(self) -> float:
        now = time.monotonic()
        return self.paused_s + (now - self._paused_at if self._paused_at is not None else 0.0)

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def pause(self) -> None:
        """Hold this engine's start (SIGSTOP to every process of it: vLLM's server, engine core
        and compile workers) while another engine's users need the cores; a start not
        yet spawned is stopped as soon as it is. Only a start behind another (`nice`) that is
        not ready yet: an engine serving is never paused. Measured on the 2-core EPYC: a
        CPU-bound process beside llama.cpp's single stream slowed it 8-25x even in the idle
        scheduling class or at nice 19; only not running at all leaves the cores to it."""
        if not self.nice:
            return
        self._hold = True
        self._stop_start()

    def resume(self) -> None:
        """Let a held start go on (SIGCONT to its group)."""
        self._hold = False
        self._continue_start()

    def _stop_start(self) -> None:
        if self._paused_at is not None:
            return
        proc = self._proc
        if self._preparer is not None:
            self._signal_preparer(signal.SIGSTOP)
        elif (
            self.state in (State.STARTING, State.RESTARTING)
            and proc is not None
            and proc.returncode is None
        ):
            self._signal_tree(proc.pid, signal.SIGSTOP)
        else:
            return
        self._paused_at = time.monotonic()

    def _continue_start(self) -> None:
        if self._paused_at is None:
            return
        self.paused_s += time.monotonic() - self._paused_at
        self._paused_at = None
        if self._preparer is not None:
            self._signal_preparer(signal.SIGCONT)
        elif self._proc is not None:
            self._signal_tree(self._proc.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def preparation(self) -> Iterator[Callable[[int], None]]:
        """While this engine's model is built before its first start (`served.Backend.check`,
        run in a thread): the state is `preparing`, and the callback it gives, called from that
        thread with the pid of a child that does the work (`convert.run_conversion`'s
        `on_spawn`), has the child treated as a start behind another is: at this supervisor's
        lower priority, paused (`pause`) while the first engine's users need the cores.
        Converting vLLM's weights takes a CPU-bound process about 25 s on two cores; beside
        llama.cpp's stream it would slow it many times over (`server.warmup`)."""
        loop = asyncio.get_running_loop()
        self.state = State.PREPARING
        self.started_at = time.monotonic()

        def spawned(pid: int) -> None:
            loop.call_soon_threadsafe(self._prepared_by, pid)

        try:
            yield spawned
        finally:
            self._end_preparer()
            self._preparer = None
            if self.state is State.PREPARING:
                self.state = State.STOPPED

    def _prepared_by(self, pid: int) -> None:
        if self.state is not State.PREPARING or self._stopping:  # given up: it must not run on
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
            return
        try:
            # psutil checks a pid against the process's start time before each signal, so a
            # child that has ended is never mistaken for a later process given its pid.
            self._preparer = psutil.Process(pid)
        except psutil.Error:
            return  # ended already
        if self.nice:  # as `engines.launch` lowers a start: niced, in the idle class
            with contextlib.suppress(psutil.Error, OSError):
                if hasattr(os, "SCHED_IDLE"):
                    os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
                self._preparer.nice(self.nice)
        if self._hold:
            self._stop_start()

    def _end_preparer(self) -> None:
        """The building child ended, if it still runs: the build has ended or is given up (the
        service stops while the thread still waits on the child), and the child must not go on,
        nor keep the service's exit waiting on it. Continued first, which also closes the
        account of its pause (`paused_s`)."""
        self._continue_start()
        self._signal_preparer(signal.SIGKILL)

    def _signal_preparer(self, sig: signal.Signals) -> None:
        """`sig` to the process building the model, and to any process of its own."""
        preparer = self._preparer
        if preparer is None:
            return
        with contextlib.suppress(psutil.Error):
            for proc in (preparer, *preparer.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)

    @property
    def parked(self) -> bool:
        return self._parked_at is not None

    def rest(self, idle: bool) -> None:
        """Whether this engine has nothing to do (no request of the front's runs on it:
        `server.warmup`). A ready engine started behind another (`nice`) that stays idle for
        `REST_AFTER_S` is stopped (SIGSTOP to every process of it) until it has work again:
        idle, vLLM's server and engine core still wake a few times a second, and on a small CPU
        each wake-up takes its time from the first engine's user (measured on the 2-core EPYC:
        about 1.5% of a core, and a stream on llama.cpp beside it 1-2% slower than beside the
        same vLLM stopped). Continuing it takes a signal to each process, a few milliseconds."""
        self._rest = idle
        self._settle()

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Keep the engine running (continued at once if it was stopped to rest) while the
        front asks it something outside of a request's slot: health, metrics, a model list,
        token counts, an adapter to load."""
        self._users += 1
        self._settle()
        try:
            yield
        finally:
            self._users -= 1
            self._settle()

    def _restful(self) -> bool:
        proc = self._proc
        return (
            self._rest
            and self._users == 0
            and bool(self.nice)
            and self.state is State.READY
            and not self._stopping
            and proc is not None
            and proc.returncode is None
        )

    def _settle(self) -> None:
        """Stop or continue a ready engine as `rest` and `awake` say (see `rest`)."""
        if not self._restful():
            if self._rest_timer is not None:
                self._rest_timer.cancel()
                self._rest_timer = None
            self._unpark()
        elif self._parked_at is None and self._rest_timer is None:
            loop = asyncio.get_running_loop()
            self._rest_timer = loop.call_later(REST_AFTER_S, self._park)

    def _park(self) -> None:
        self._rest_timer = None
        if self._restful() and self._parked_at is None and self._proc is not None:
            self._signal_tree(self._proc.pid, signal.SIGSTOP)
            self._parked_at = time.monotonic()
            self.parks += 1

    def _unpark(self) -> None:
        if self._parked_at is None:
            return
        self.parked_s += time.monotonic() - self._parked_at
        self._parked_at = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._signal_tree(proc.pid, signal.SIGCONT)

    def _parked_total(self) -> float:
        now = time.monotonic()
        return self.parked_s + (now - self._parked_at if self._parked_at is not None else 0.0)

    def _unnice(self, pid: int) -> None:
        """Give an engine started behind another (`nice`: niced, in the idle scheduling class)
        its normal priority back now that it is ready: every thread of every process of its
        group. Raising a priority needs CAP_SYS_NICE (or a RLIMIT_NICE allowing it); without,
        the engine stays low, running on what the first engine leaves idle: it still takes a
        crowd once the first engine's requests are done (`server.routing`)."""
        if not self.nice:
            return
        try:
            os.setpriority(os.PRIO_PGRP, pid, 0)
            for tid in _threads_of_group(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:
            log.info("%s engine keeps its lower priority: %s", self.engine.name, exc)

    @staticmethod
    async def _exited(proc: asyncio.subprocess.Process) -> int:
        """The engine's exit code, as soon as it exits. Not `proc.wait()`: asyncio only returns
        from that once the output pipe closes too, and the engine's own children (vLLM's engine
        core) hold it open after the engine itself has died. The wait is on a pidfd, readable
        once the process has exited: polling a running engine woke the front five times a
        second, CPU taken from the engine's threads (see `runtime.DrainingServer.main_loop`)."""
        fd = _pidfd(proc.pid) if proc.returncode is None else None
        if fd is not None:
            try:
                if proc.returncode is None:  # reaped meanwhile: the pid may be another's now
                    loop = asyncio.get_running_loop()
                    gone: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(fd, _settle, gone)
                    try:
                        await gone
                    finally:
                        loop.remove_reader(fd)
            finally:
                os.close(fd)
        while proc.returncode is None:  # noqa: ASYNC110 (asyncio reaps it on SIGCHLD)
            await asyncio.sleep(REAP_POLL_S if fd is not None else EXIT_POLL_S)
        return proc.returncode

    async def _backoff(self, attempt: int) -> None:
        self.state = State.RESTARTING
        await asyncio.sleep(self.backoff_s[min(attempt, len(self.backoff_s)) - 1])

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the engine's whole process group, SIGKILL after a grace period."""
        self._continue_start()  # a stopped process would only take SIGTERM once continued
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

    @classmethod
    def _signal_tree(cls, pid: int, sig: signal.Signals) -> None:
        """`sig` to every process of the engine: its process group, and its descendants wherever
        they are (a compile worker may run in a session of its own)."""
        cls._kill_group(pid, sig)
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, sig)

    async def stop(self) -> None:
        self._stopping = True
        self._settle()  # a stopped process would only take SIGTERM once continued
        self.ready.clear()
        if self.state is State.PREPARING:
            # Stopped without the join being cancelled: the build is given up here (its staging
            # folder is removed by the cache), and the thread that waits on it returns.
            self._end_preparer()
        if self._proc is not None:
            await self._terminate(self._proc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._unlink()
        if self._folder is not None:
            self._folder.remove()  # and the socket in it
            self._folder = None
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
            # An engine started behind another: how long its start yielded the cores to the
            # first engine's users, and whether it rests now (stopped while it has nothing to
            # do), how often it has and how long in all.
            **(
                {
                    "paused": self.paused,
                    "paused_s": round(self._paused_total(), 1),
                    "parked": self.parked,
                    "parks": self.parks,
                    "parked_s": round(self._parked_total(), 1),
                }
                if self.nice
                else {}
            ),
        }
