"""Where an engine listens and how the front reaches it: a Unix socket in a private folder.

Engines never listen on a TCP port. Any local process can connect to a loopback port, and vLLM's
key guards only its `/v1` routes (its `/tokenize`, `/metrics`, `/invocations`, `/collective_rpc`...
stay open), so a port would let other processes around inferd's keys, limits and rails; and a
port picked by probing can be taken by another process before the engine binds it. Instead each
supervisor makes a `RuntimeFolder` (mode 0700, under `$XDG_RUNTIME_DIR` or the temp folder) and
each engine start gets a socket path there (`Engine.command`); no other user can open the folder,
and the engine's per-start key (`Engine.secret_env`) still guards against processes of inferd's
own user. `listening` is the supervisor's listener check before it asks the engine anything;
an `EngineLink` holds the connection pools to one engine start, used by the supervisor's polling,
`server.engine_client` (requests, guard models) and `server.management` (metrics, model list).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import psutil

from inferd.errors import EngineStartError

# sockaddr_un's sun_path holds 108 bytes on Linux (104 on macOS) with the closing NUL: a longer
# path cannot be bound, and engines report that badly (llama-server: "couldn't bind").
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
# The host part of every URL to an engine; the connection goes to the socket whatever it says.
BASE_URL = "http://engine"
# Idle engine connections are dropped after 4 s, before the engines' own servers close them
# (llama-server and uvicorn both after 5 s): reusing one they just closed fails.
ENGINE_KEEPALIVE_S = 4.0
_LABEL = re.compile(r"[^A-Za-z0-9._-]")


def runtime_bases() -> list[Path]:
    """Where private folders may go, best first: the user's runtime folder (a tmpfs of mode
    0700, emptied at logout) when it is really private, then the temp folder."""
    bases = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        with contextlib.suppress(OSError):
            info = Path(xdg).lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                bases.append(Path(xdg))
    return [*bases, Path(tempfile.gettempdir()), Path("/tmp")]  # noqa: S108 (a 0700 subfolder)


class RuntimeFolder:
    """One supervisor's private folder (mode 0700) and the socket path of each engine start."""

    # The longest socket name `socket` makes: the path check reserves room for it.
    _NAME = "engine-{start}.sock"
    _LONGEST = len(_NAME.format(start=99999))

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def _prefix(label: str) -> str:
        return f"inferd-{_LABEL.sub('-', label)[:24]}-"

    @classmethod
    def _fits(cls, base: Path, prefix: str) -> bool:
        # mkdtemp adds 8 characters to the prefix.
        longest = len(os.fsencode(base)) + 1 + len(prefix) + 8 + 1 + cls._LONGEST
        return longest <= MAX_SOCKET_PATH and base.is_dir()

    @classmethod
    def planned(cls, label: str) -> Path:
        """The socket path a first start would get, `XXXXXXXX` standing for the folder's random
        part (what `serve --dry-run` shows; nothing is made)."""
        prefix = cls._prefix(label)
        base = next((b for b in runtime_bases() if cls._fits(b, prefix)), Path("/tmp"))  # noqa: S108
        return base / f"{prefix}XXXXXXXX" / cls._NAME.format(start=1)

    @classmethod
    def create(cls, label: str) -> RuntimeFolder:
        """A new folder for the engine of `label` (a served model id, cut to stay short)."""
        prefix = cls._prefix(label)
        tried = []
        for base in runtime_bases():
            if not cls._fits(base, prefix):
                tried.append(str(base))
                continue
            try:
                # Mode 0700, made atomically under a name nobody could have guessed.
                return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=base)))
            except OSError as exc:
                tried.append(f"{base} ({exc.strerror})")
        raise EngineStartError(
            f"no folder for the engine's socket: a Unix socket path holds at most "
            f"{MAX_SOCKET_PATH} bytes and none of {', '.join(tried)} is short enough and "
            "writable; set TMPDIR (or XDG_RUNTIME_DIR) to a short folder, such as /tmp"
        )

    def socket(self, start: int) -> Path:
        """The socket path of engine start number `start` (a new path each start: a file left by
        an earlier start is never taken for the new engine's)."""
        path = self.path / self._NAME.format(start=start)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise EngineStartError(
                f"the engine's socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a "
                "Unix socket allows; set TMPDIR (or XDG_RUNTIME_DIR) to a shorter folder"
            )
        return path

    def clear(self) -> None:
        """Remove the sockets earlier starts left (engines never unlink theirs)."""
        for stale in self.path.glob("*.sock"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def held_by_tree(pid: int, path: Path) -> bool:
    """Whether process `pid` or one of its descendants holds the Unix socket bound at `path`."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            # A Unix socket's address is its path (typed as an (ip, port) pair).
            if any(str(c.laddr) == str(path) for c in proc.net_connections(kind="unix")):
                return True
    return False


def listening(path: Path, folder: RuntimeFolder, pid: int) -> bool:
    """Whether the engine started (pid `pid`) listens on its socket `path` yet. EngineStartError
    when the file there is not the engine's socket in the private folder: then nothing (not the
    key) is sent to it. Once it is, its mode is set to 0600 (the engine made it under its umask;
    the folder's 0700 keeps other users out either way)."""
    try:
        where = folder.path.lstat()
        info = path.lstat()
    except FileNotFoundError:
        return False  # not bound yet: the engine is still loading
    if not stat.S_ISDIR(where.st_mode) or where.st_uid != os.getuid() or where.st_mode & 0o077:
        raise EngineStartError(f"{folder.path} is no longer a private folder (mode 0700) of ours")
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise EngineStartError(f"{path} is not a socket of this user's")
    # bind() makes the file with the socket already in the process's table: no race here.
    if not held_by_tree(pid, path):
        raise EngineStartError(
            f"{path} is held by another process, not by the engine started (pid {pid}); "
            "refusing to send it requests"
        )
    os.chmod(path, 0o600)
    return True


class EngineLink:
    """The connection pools to one engine start, over its socket. Timeouts are per request:
    `server.engine_client` gives its requests the front's read timeout."""

    def __init__(self, socket: Path) -> None:
        # aiohttp (about 0.3 s to import) comes in with the first link, once an engine is
        # running: `inferd serve` starts its engines before it imports the web stack, so the
        # two overlap (`server.boot`).
        import aiohttp

        self.socket = socket
        # No pool limit: admission control decides how many requests reach an engine, not the
        # connection pool. No total timeout: a long generation is not an error.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self.pool = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(
                path=str(socket), limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S
            ),
            timeout=timeout,
            auto_decompress=False,
        )
        # Retries go out on a connection of their own, never a pooled one: when an engine has
        # closed one pooled connection it has often closed others (seen on a GPU, where a
        # retry on the pool failed again and turned a harmless race into a 502).
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket), limit=0, force_close=True),
            timeout=timeout,
            auto_decompress=False,
        )

    @staticmethod
    def url(path: str) -> str:
        return BASE_URL + path

    async def close(self) -> None:
        await self.pool.close()
        await self.fresh.close()
