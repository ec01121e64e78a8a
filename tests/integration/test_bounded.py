"""Issue 16 through real sockets: auth stays closed when the keys go, engine output of any line
length is read, request headers and connections are bounded, and the drain counts every request
from its arrival. The engine is the recorded one, a real process under the real supervisor."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.catalog import Catalog
from inferd.engines.base import EngineCommand
from inferd.server.keys import KeyFile
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor
from tests.integration.conftest import (
    MODEL,
    RECORDED,
    Front,
    RecordedEngine,
    served_model,
    settings,
    start_front,
    stop_front,
)
from tests.integration.test_hardening import _metric

FAST = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
SLOW = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "slow"}]}


def _front(tmp_path: Path, **values: object) -> Front:
    front = start_front(served_model(tmp_path), settings(tmp_path, **values))
    front.wait_ready()
    return front


def _port(front: Front) -> int:
    return int(front.url.rsplit(":", 1)[1])


def _connect(front: Front, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(front)), timeout=timeout)


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response read off a raw socket: (status, body); (0, b"") if it was closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return 0, b""
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def _get(sock: socket.socket, path: str = "/v1/health/live", extra: bytes = b"") -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n")


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """The server may refuse and close before all of it is sent: that is an answer too."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _wait_metric(front: Front, name: str, at_least: float) -> None:
    deadline = time.monotonic() + 5
    while _metric(front, name) < at_least:
        assert time.monotonic() < deadline, name
        time.sleep(0.02)


# --------------------------------------------------------------------------- fail closed


def test_emptying_the_keys_file_while_serving_refuses_everyone(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key = KeyFile(keys_file).create("app", rpm=None, tpm=None)
    front = _front(tmp_path, api_keys_file=keys_file)
    ok = {"Authorization": f"Bearer {key}"}
    try:
        with front.client() as c:
            assert c.post("/v1/chat/completions", json=FAST, headers=ok).status_code == 200
            for emptied in ("{}", None):  # replaced by `{}`, then deleted
                if emptied is None:
                    keys_file.unlink()
                else:
                    keys_file.write_text(emptied)
                for headers in (ok, {}):
                    r = c.post("/v1/chat/completions", json=FAST, headers=headers)
                    assert r.status_code == 401, r.text
                    assert "no API keys" in r.json()["error"]["message"]
                assert c.get("/v1/models").status_code == 401
    finally:
        stop_front(front)


# --------------------------------------------------------------------------- engine output

# Prints a 4 MiB line and then more than a pipe's worth of lines before the recorded engine
# starts listening: if the front stops reading its output, the engine blocks and never serves.
_LOUD = """
import os, sys
out = sys.stdout.buffer
out.write(b"L" * (4 << 20) + b"\\n")
for i in range(100):
    out.write(b"after %d " % i + b"y" * 1024 + b"\\n")
out.write(b"loud engine done\\n")
out.flush()
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


class LoudEngine(RecordedEngine):
    def command(self, socket: Path) -> EngineCommand:
        script = self.cache_dir / "loud.py"
        script.write_text(_LOUD)
        return EngineCommand(
            [sys.executable, str(script), str(RECORDED), *self.listen_flags(socket)]
        )


def test_an_engine_line_longer_than_any_buffer_does_not_stop_its_output(tmp_path: Path) -> None:
    entry = Catalog.load().get(MODEL)
    profile = entry.profile("vllm-cpu-bf16")
    assert profile is not None
    engine = LoudEngine(MODEL, tmp_path, profile, [], tmp_path)
    supervisor = Supervisor(engine, ready_timeout_s=15, backoff_s=(0.2,))
    served = ServedModel(entry, profile, supervisor, "Apache License 2.0 (text)", {"source": {}})
    front = start_front(served, settings(tmp_path))
    try:
        front.wait_ready(timeout=15)
        tail = list(supervisor.tail)
        assert "loud engine done" in tail
        long = [line for line in tail if line.startswith("LLLL")]
        assert len(long) == 1 and len(long[0]) < 64 * 1024
        assert "cut" in long[0]  # says it was truncated, and by how much
        assert sum(1 for line in tail if line.startswith("after ")) == 100
        with front.client() as c:
            assert c.post("/v1/chat/completions", json=FAST).status_code == 200
    finally:
        stop_front(front)


# --------------------------------------------------------------------------- headers


@pytest.fixture
def bounded(tmp_path: Path) -> Any:
    front = _front(
        tmp_path,
        max_header_bytes=16 * 1024,
        max_headers=50,
        header_timeout_s=1.0,
        max_connections=8,
    )
    yield front
    stop_front(front)


def test_oversized_headers_are_refused(bounded: Front) -> None:
    with _connect(bounded) as sock:
        started = time.monotonic()
        _send_quietly(sock, b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\nX-Big: ")
        _send_quietly(sock, b"a" * (1 << 20))  # never finished: the server must not wait
        status, body = _response(sock)
        assert status == 431, body
        assert json.loads(body)["error"]["code"] == "headers_too_large"
        assert time.monotonic() - started < 3
    with _connect(bounded) as sock:  # all of it at once, complete
        _send_quietly(sock, b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40000)
        _send_quietly(sock, b"\r\n\r\n")
        status, body = _response(sock)
        assert status == 431, body
    with _connect(bounded) as sock:  # just under: served
        _get(sock, extra=b"X-Fine: " + b"a" * 8000 + b"\r\n")
        assert _response(sock)[0] == 200


def test_too_many_headers_are_refused(bounded: Front) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    with _connect(bounded) as sock:
        _get(sock, extra=many)
        status, body = _response(sock)
        assert status == 431, body
        assert json.loads(body)["error"]["code"] == "too_many_headers"
    with _connect(bounded) as sock:
        _get(sock, extra=b"".join(b"X-H%d: v\r\n" % i for i in range(40)))
        assert _response(sock)[0] == 200


def _cut_after(sock: socket.socket, front: Front, *, trickle: bool, limit_s: float) -> float | None:
    """Seconds until the server answers or closes `sock`, sending it a header byte every 0.2 s
    (`trickle`) while another client is served normally; None if it is still open at `limit_s`."""
    started = time.monotonic()
    sock.settimeout(0.2)
    with front.client() as c:
        while time.monotonic() - started < limit_s:
            try:
                if trickle:
                    sock.sendall(b"X")  # a header byte at a time, never the end
                sock.recv(65536)  # an answer (408) or the close (b"")
                return time.monotonic() - started
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            assert c.get("/v1/health/live").status_code == 200  # others are served meanwhile
    return None


def test_a_slow_header_sender_is_cut_while_others_are_served(bounded: Front) -> None:
    with _connect(bounded) as slow:
        slow.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        cut = _cut_after(slow, bounded, trickle=True, limit_s=5)
        assert cut is not None and cut < 3, cut
    with _connect(bounded) as idle:  # connected, nothing sent: cut as well
        cut = _cut_after(idle, bounded, trickle=False, limit_s=5)
        assert cut is not None and cut < 3, cut


def test_connections_beyond_the_cap_are_refused_while_open_ones_work(bounded: Front) -> None:
    held = [_connect(bounded) for _ in range(8)]
    try:
        for sock in held:
            _get(sock)
            assert _response(sock)[0] == 200
        with _connect(bounded) as extra:
            _send_quietly(extra, b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            status, body = _response(extra)
            assert status == 503, body
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        for sock in held:  # the ones already open keep working
            _get(sock)
            assert _response(sock)[0] == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # once they are closed, new connections are served again
        with _connect(bounded) as sock:
            _get(sock)
            if _response(sock)[0] == 200:
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --------------------------------------------------------------------------- drain


def _post_in_thread(
    front: Front, body: dict[str, Any], out: list[httpx.Response]
) -> threading.Thread:
    def run() -> None:
        with front.client(timeout=30) as c:
            out.append(c.post("/v1/chat/completions", json=body))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_queued_requests_get_503_when_the_drain_starts(tmp_path: Path) -> None:
    front = _front(tmp_path, drain_timeout_s=1.0, max_running=1, max_queue=4)
    first: list[httpx.Response] = []
    queued: list[httpx.Response] = []
    t1 = _post_in_thread(front, SLOW, first)  # 15 events, 0.3 s apart: outlives the drain
    _wait_metric(front, "num_requests_running", 1)
    t2 = _post_in_thread(front, SLOW, queued)
    _wait_metric(front, "num_requests_waiting", 1)
    front.server.handle_exit(signal.SIGTERM, None)
    t2.join(timeout=10)
    t1.join(timeout=10)
    assert queued[0].status_code == 503, queued[0].text
    assert queued[0].json()["error"]["code"] == "shutting_down"
    events = [e for e in first[0].text.split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    front.thread.join(timeout=30)
    assert not front.thread.is_alive()


def test_the_drain_waits_for_a_request_still_sending_its_body(tmp_path: Path) -> None:
    front = _front(tmp_path, drain_timeout_s=10.0)
    body = json.dumps(FAST).encode()
    with _connect(front, timeout=15) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        time.sleep(0.3)  # the request has arrived: the app is reading its body
        front.server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.5)
        with front.client() as c:  # still draining, so still answering (readiness 503)
            ready = c.get("/v1/health/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
        sock.sendall(body[10:])
        status, answer = _response(sock)
        assert status == 200, answer
    front.thread.join(timeout=30)
    assert not front.thread.is_alive()


# --------------------------------------------------------------------------- engine read timeout


def test_an_engine_that_goes_silent_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    # The recorded engine waits 0.3 s between the events of a "slow" answer.
    front = _front(tmp_path, engine_read_timeout_s=0.1)
    try:
        with front.client(timeout=30) as c:
            body = c.post("/v1/chat/completions", json=SLOW).text
        events = [e for e in body.split("\n\n") if e.startswith("data: {")]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "engine_unavailable"
        assert body.rstrip().endswith("data: [DONE]")
    finally:
        stop_front(front)


def test_the_front_takes_a_bounded_answer_from_the_engine(tmp_path: Path) -> None:
    # The recorded chat answer is about 1 KB, its stream events a few hundred bytes each.
    front = _front(tmp_path, max_engine_answer_bytes=300)
    try:
        with front.client(timeout=30) as c:
            whole = c.post("/v1/chat/completions", json=FAST)
            assert whole.status_code == 502
            assert "exceeds 300 bytes" in whole.json()["error"]["message"]
            fine = c.post("/v1/chat/completions", json={**SLOW, "messages": FAST["messages"]})
            assert fine.status_code == 200  # every event fits: the stream is whole
            assert fine.text.rstrip().endswith("data: [DONE]")
    finally:
        stop_front(front)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/guardrails/check"])
def test_deeply_nested_json_is_a_400(front: Front, path: str) -> None:
    body = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with front.client() as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "nested too deeply" in r.text
