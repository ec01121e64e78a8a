"""The front over a recorded engine: forwarding, streaming, errors, metrics, management routes."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.conftest import (
    MODEL,
    Front,
    served_model,
    settings,
    start_front,
    stop_front,
)
from tests.integration.recorded_engine import FLOOD_EVENTS


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def _metric(front: Front, name: str) -> float:
    with front.client() as c:
        for line in c.get("/v1/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_non_streamed_chat_passes_through(front: Front) -> None:
    with front.client() as c:
        r = c.post("/v1/chat/completions", json=_chat("hi"), headers={"X-Request-Id": "req-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-1"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 12
    assert _metric(front, "generation_tokens_total") == 12


def test_stream_events_arrive_one_by_one(front: Front) -> None:
    arrivals: list[float] = []
    events: list[str] = []
    with (
        front.client() as c,
        c.stream("POST", "/v1/chat/completions", json=_chat("slow", stream=True)) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                events.append(line)
    # 0.3 s between engine events: if the front buffered, they would arrive together.
    assert arrivals[-1] - arrivals[0] > 2.0
    assert events[-1] == "data: [DONE]"
    # The client did not ask for usage, so the chunk inferd asked for is not shown...
    assert not any('"choices":[]' in e for e in events)
    # ...but the token counters are exact.
    assert _metric(front, "generation_tokens_total") == 12
    assert _metric(front, "prompt_tokens_total") == 34


def test_stream_with_usage_keeps_the_usage_chunk(front: Front) -> None:
    body = _chat("hi", stream=True, stream_options={"include_usage": True})
    with front.client() as c:
        text = c.post("/v1/chat/completions", json=body).text
    data = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert data[-1]["choices"] == []
    assert data[-1]["usage"]["completion_tokens"] == 12


def test_errors_use_the_openai_envelope(front: Front) -> None:
    cases = [
        ("POST", "/v1/chat/completions", b"{bad", 400, None, "invalid_request"),
        ("POST", "/v1/chat/completions", b"[]", 400, None, "invalid_request"),
        ("POST", "/v1/chat/completions", b"", 400, None, "invalid_request"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "model", "invalid_request"),
        ("POST", "/v1/chat/completions", b'{"model": 7}', 400, "model", "invalid_request"),
        ("POST", "/v1/chat/completions", b'{"model": "gpt-9"}', 404, "model", "model_not_found"),
        (
            "POST",
            "/v1/chat/completions",
            json.dumps(_chat("x", stream="yes")).encode(),
            400,
            "stream",
            "invalid_request",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json.dumps(_chat("invalid")).encode(),
            400,
            "max_tokens",
            "invalid_request",
        ),
        ("GET", "/v1/nowhere", b"", 404, None, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, None, "method_not_allowed"),
    ]
    with front.client() as c:
        for method, path, body, status, param, code in cases:
            r = c.request(method, path, content=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert (err["param"], err["code"]) == (param, code), (body, err)


def test_management_routes(front: Front) -> None:
    with front.client() as c:
        assert c.get("/v1/health/live").json() == {"status": "live"}
        ready = c.get("/v1/health/ready").json()
        assert ready["models"][MODEL]["state"] == "ready"
        meta = c.get("/v1/metadata").json()
        assert meta["selectedModelProfileId"] == "vllm-cpu-bf16"
        assert meta["models"][0]["engine"] == {
            "name": "recorded",
            "version": "0.32.0",
            "state": "ready",
        }
        assert c.get("/v1/version").json()["release"]
        assert c.get("/v1/license").json()["licenses"][0]["content"].startswith("Apache")
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert (
            c.post("/v1/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()["count"]
            == 2
        )
        metrics = c.get("/v1/metrics").text
    assert 'num_requests_running{model="smollm2-135m-instruct"} 0.0' in metrics
    assert "vllm:num_requests_running" in metrics  # the engine's own, passed through
    assert metrics.count("# TYPE process_cpu_seconds_total") <= 1  # no duplicate families


def _dechunked(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body (after the head), its chunks joined."""
    body, at = b"", 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return body
        body += raw[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


def test_a_slow_client_holds_the_engine_back_and_gets_every_event_in_order(front: Front) -> None:
    """A client that reads slower than the engine writes: the front's sends wait for it (the
    relay's held path) and the engine's stream is held meanwhile rather than read into memory;
    every event still arrives, once and in order."""
    body = json.dumps(_chat("flood", stream=True)).encode()
    host, port = front.url.removeprefix("http://").split(":")
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        conn.connect((host, int(port)))
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
        )
        raw = conn.recv(4096)
        time.sleep(1.5)  # the engine writes its ~5 MB in well under this when nothing holds it
        with front.engine() as direct:
            assert direct.get("/debug/open-streams").json()["open"] == 1
        conn.settimeout(30)
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    events = [e for e in _dechunked(rest).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    words = [
        json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
    ]
    flood = [w.split(" ")[0] for w in words if w.startswith("w")]
    assert flood == [f"w{i}" for i in range(FLOOD_EVENTS)]
    assert _metric(front, "num_requests_running") == 0


def test_client_disconnect_closes_the_engine_stream(front: Front) -> None:
    with front.client() as c, front.engine() as direct:
        with c.stream("POST", "/v1/chat/completions", json=_chat("slow", stream=True)) as r:
            next(r.iter_lines())
        engine = direct.get("/debug/open-streams").json()
        deadline = time.monotonic() + 2
        while engine["open"] and time.monotonic() < deadline:
            time.sleep(0.05)
            engine = direct.get("/debug/open-streams").json()
    assert engine["open"] == 0
    assert _metric(front, "num_requests_running") == 0


def test_a_connection_the_engine_closed_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    """The engine drops every request that arrives on a reused connection. Each burst finds the
    front's pool full of such connections; each retry must go out on a new one, or it meets
    another dropped connection and the client gets a 502 (seen at 16 streams on a GPU)."""
    front = start_front(served_model(tmp_path, "--drop-reused"), settings(tmp_path))
    try:
        front.wait_ready()
        statuses: list[int] = []

        def ask(_: int) -> None:
            with front.client() as c:
                statuses.append(c.post("/v1/chat/completions", json=_chat("hi")).status_code)

        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                list(pool.map(ask, range(8)))
        with front.engine() as direct:
            engine = direct.get("/debug/open-streams").json()
    finally:
        stop_front(front)
    assert statuses == [200] * 24
    assert engine["dropped"] >= 8  # the later bursts met closed connections and were retried
