"""Engines answer only inferd. On the shared `server` (each engine, and both behind one model, where
every check holds for each of them): the engine serves HTTP on no
TCP port, only on a Unix socket of mode 0600 in a folder of mode 0700, which another user cannot
even connect to, and its process tree listens on no TCP port but vLLM's internal gloo ones; a
process of inferd's own user, which can open the socket, gets 401 without the key of this engine
start on the routes inferd forwards. (vLLM's key guards only its /v1 routes: its /tokenize,
/metrics, /invocations, /collective_rpc... are kept from other users by the folder alone, which
is why the engine has no port.)"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.conftest import MODEL, Served, engine_client, engine_sockets

pytestmark = pytest.mark.e2e

# Listeners that are not the engine's HTTP server and cannot move to a Unix socket: vLLM's
# worker joins torch.distributed over gloo (TCP transports only), on loopback, one listener per
# process group, even with one worker. inferd sends them nothing; see docs/architecture.md.
NOT_HTTP = ("VLLM::Worker",)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def _connections(proc: psutil.Process, kind: str) -> list[Any]:
    with contextlib.suppress(psutil.Error):
        return list(proc.net_connections(kind=kind))
    return []


def _holds(proc: psutil.Process, socket: Path) -> bool:
    return any(str(c.laddr) == str(socket) for c in _connections(proc, "unix"))


def test_the_engine_listens_on_its_socket_and_on_no_tcp_port(server: Served) -> None:
    # Each engine, exec'd by the launch shim, is a child of the front; nothing else is.
    children = psutil.Process(server.proc.pid).children()
    assert len(children) == len(server.engines), children
    holders = []
    for name, (socket, _) in engine_sockets(server).items():
        found = [c for c in children if _holds(c, socket)]
        assert len(found) == 1, f"no one child of inferd holds {name}'s socket {socket}"
        engine = found[0]
        holders.append(engine)
        tree = [engine, *engine.children(recursive=True)]  # vLLM's engine core, workers
        tcp = [
            (p.name(), c.laddr)
            for p in tree
            for c in _connections(p, "tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        allowed = NOT_HTTP if name == "vllm" else ()
        assert [(n, addr) for n, addr in tcp if n not in allowed] == [], name
        assert all(ipaddress.ip_address(addr.ip).is_loopback for _, addr in tcp), tcp
        held = [p for p in tree if _holds(p, socket)]
        assert held == [engine], f"the {name} engine's HTTP server does not hold {socket}"
    assert sorted(p.pid for p in holders) == sorted(p.pid for p in children)


def test_the_engine_socket_is_private_to_inferds_user(server: Served) -> None:
    for socket, _ in engine_sockets(server).values():
        info, folder = socket.lstat(), socket.parent.lstat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
        assert info.st_uid == folder.st_uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="trying as another user needs root")
def test_another_user_cannot_connect_to_the_engine(server: Served) -> None:
    probe = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    for socket, _ in engine_sockets(server).values():
        done = subprocess.run(
            ["/usr/bin/python3", "-c", probe, str(socket)],
            user=65534,  # nobody
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0 and "PermissionError" in done.stderr, done.stderr


def _continue_resting_engines(server: Served) -> None:
    """A later engine of a combined profile rests stopped (SIGSTOP) once it has had nothing to
    do for a second, and the front continues it for its own requests; this test talks to the
    engine past the front, so once it rests it continues it itself (the front, which thinks it
    stopped, rests it again only after its next request to it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = httpx.get(server.url + "/v1/health/ready", timeout=5).json()
        engines = ready["models"][MODEL].get("engines", [])
        if all(e.get("parked", True) for e in engines):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"a later engine did not rest within 30 s: {engines}")
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_STOPPED:
                proc.resume()


def test_the_engine_refuses_requests_without_the_key(server: Served) -> None:
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    sockets = engine_sockets(server)
    _continue_resting_engines(server)
    # Each engine start has its own key: another engine's opens nothing (with several).
    keys = {key for _, key in sockets.values()}
    assert len(keys) == len(sockets)
    for socket, key in sockets.values():
        wrong = [engine_client(socket), engine_client(socket, "not-the-key")]
        wrong += [engine_client(socket, other) for other in keys - {key}]
        for anyone in wrong:
            with anyone:
                assert anyone.post("/v1/chat/completions", json=CHAT).status_code == 401
                assert anyone.post("/v1/completions", json=completion).status_code == 401
        with engine_client(socket, key) as inferd:  # what inferd sends: the key of this start
            assert inferd.post("/v1/chat/completions", json=CHAT).status_code == 200
    through = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=120)
    assert through.status_code == 200, through.text
