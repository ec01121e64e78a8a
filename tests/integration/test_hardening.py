"""Admission control, API keys, limits, drain, TLS, CORS and request ids, through real HTTP
against a recorded engine (a separate process replaying real vLLM answers)."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.server.keys import KeyFile
from tests.integration.conftest import (
    MODEL,
    Front,
    served_model,
    settings,
    start_front,
    stop_front,
)

SLOW = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "slow"}]}
FAST = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _front(tmp_path: Path, client: dict[str, Any] | None = None, **values: object) -> Front:
    front = start_front(served_model(tmp_path), settings(tmp_path, **values), **(client or {}))
    front.wait_ready()
    return front


def _metric(front: Front, name: str) -> float:
    with front.client() as c:
        for line in c.get("/v1/metrics").text.splitlines():
            if line.startswith(f'{name}{{model="{MODEL}"}}'):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def _stream_in_thread(front: Front, results: list[object]) -> threading.Thread:
    def run() -> None:
        with front.client(timeout=30) as c:
            results.append(c.post("/v1/chat/completions", json=SLOW).text)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_admission_runs_one_queues_one_refuses_the_rest(tmp_path: Path) -> None:
    front = _front(tmp_path, max_running=1, max_queue=1)
    try:
        results: list[object] = []
        threads = [_stream_in_thread(front, results) for _ in range(2)]
        deadline = time.monotonic() + 5
        while _metric(front, "num_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _metric(front, "num_requests_running") == 1
        started = time.monotonic()
        with front.client() as c:
            refused = c.post("/v1/chat/completions", json=SLOW)
        assert time.monotonic() - started < 1.0  # at once, not after a wait
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "overloaded"
        for t in threads:
            t.join()
        assert all(isinstance(r, str) and r.endswith("data: [DONE]\n\n") for r in results)
        assert (_metric(front, "num_requests_running"), _metric(front, "num_requests_waiting")) == (
            0,
            0,
        )
    finally:
        stop_front(front)


def test_queue_timeout_is_a_503(tmp_path: Path) -> None:
    front = _front(tmp_path, max_running=1, max_queue=4, queue_timeout_s=0.3)
    try:
        results: list[object] = []
        t = _stream_in_thread(front, results)
        time.sleep(0.3)
        with front.client() as c:
            r = c.post("/v1/chat/completions", json=FAST)
        assert r.status_code == 503 and "no free slot within 0.3 s" in r.json()["error"]["message"]
        t.join()
    finally:
        stop_front(front)


def test_api_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys_file = tmp_path / "keys.json"
    good = KeyFile(keys_file).create("app", rpm=3, tpm=None)
    other = KeyFile(keys_file).create("other", rpm=None, tpm=None)
    front = _front(tmp_path, api_keys_file=keys_file)
    try:
        with front.client() as c:
            assert c.get("/v1/health/ready").status_code == 200  # health stays open
            assert c.get("/v1/metrics").status_code == 200
            r = c.post("/v1/chat/completions", json=FAST)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models").status_code == 401
            wrong = {"Authorization": f"Bearer {good[:-2]}xx"}
            assert c.post("/v1/chat/completions", json=FAST, headers=wrong).status_code == 401
            ok = {"Authorization": f"Bearer {good}"}
            assert c.post("/v1/chat/completions", json=FAST, headers=ok).status_code == 200
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.post("/v1/chat/completions", json=FAST, headers=ok).status_code == 200
            limited = c.post("/v1/chat/completions", json=FAST, headers=ok)
            assert limited.status_code == 429
            assert "3 requests per minute" in limited.json()["error"]["message"]
            assert int(limited.headers["retry-after"]) >= 1
            # Revoked on disk, refused at once by the running service.
            KeyFile(keys_file).revoke("other")
            os.utime(keys_file, ns=(1, os.stat(keys_file).st_mtime_ns + 1))
            assert (
                c.post(
                    "/v1/chat/completions", json=FAST, headers={"Authorization": f"Bearer {other}"}
                ).status_code
                == 401
            )
    finally:
        stop_front(front)
    assert good not in caplog.text and other not in caplog.text  # keys never reach the logs


def test_metrics_can_require_a_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key = KeyFile(keys_file).create("prom", rpm=None, tpm=None)
    front = _front(tmp_path, api_keys_file=keys_file, metrics_auth=True)
    try:
        with front.client() as c:
            assert c.get("/v1/metrics").status_code == 401
            assert (
                c.get("/v1/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            )
    finally:
        stop_front(front)


def test_body_and_parameter_limits(front: Front) -> None:
    with front.client() as c:
        big = c.post(
            "/v1/chat/completions",
            content=b"x" * (4 * 2**20 + 1),
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"
        unknown = c.post("/v1/chat/completions", json={**FAST, "store": True})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["param"] == "store"
        too_many = c.post("/v1/chat/completions", json={**FAST, "n": 99})
        assert too_many.json()["error"]["param"] == "n"


def test_request_id_on_every_log_line_and_echoed(
    front: Front, caplog: pytest.LogCaptureFixture
) -> None:
    from inferd.observability.logs import RequestIdFilter

    handler_filter = RequestIdFilter()
    logging.getLogger().addFilter(handler_filter)
    caplog.set_level(logging.INFO, logger="inferd.requests")
    caplog.handler.addFilter(handler_filter)
    with front.client() as c:
        r = c.post("/v1/chat/completions", json=FAST, headers={"X-Request-Id": "trace-42"})
        generated = c.post("/v1/chat/completions", json=FAST)
    assert r.headers["x-request-id"] == "trace-42"
    assert len(generated.headers["x-request-id"]) == 32
    lines = [rec for rec in caplog.records if rec.name == "inferd.requests"]
    assert any(getattr(rec, "request_id", None) == "trace-42" for rec in lines)
    assert all("hi" not in rec.getMessage() for rec in lines)  # prompts are not logged


def test_cors_is_off_unless_origins_are_named(tmp_path: Path, front: Front) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with front.client() as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    allowed = _front(tmp_path, cors_origins="https://app.example")
    try:
        with allowed.client() as c:
            r = c.options("/v1/chat/completions", headers=preflight)
            assert r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        stop_front(allowed)


def test_drain_lets_requests_finish_then_cuts_streams(tmp_path: Path) -> None:
    front = _front(tmp_path, drain_timeout_s=1.0)
    results: list[object] = []
    t = _stream_in_thread(front, results)  # 15 events, 0.3 s apart: outlives the drain
    deadline = time.monotonic() + 5
    while _metric(front, "num_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    front.server.handle_exit(signal.SIGTERM, None)
    time.sleep(0.2)
    with front.client() as c:
        ready = c.get("/v1/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = c.post("/v1/chat/completions", json=FAST)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    t.join(timeout=10)
    text = results[0]
    assert isinstance(text, str)
    events = [e for e in text.split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert events[-1] == "data: [DONE]"
    front.thread.join(timeout=30)
    assert not front.thread.is_alive()


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=inferd test CA",
    )
    (tmp / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        )
    return {n: tmp / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _trust(certs: dict[str, Path], *, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
    if client:
        context.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
    return context


def test_tls_and_mtls(tmp_path: Path) -> None:
    c = _certs(tmp_path)
    tls = _front(
        tmp_path,
        {"verify": _trust(c)},
        ssl_mode="tls",
        ssl_certfile=c["server.pem"],
        ssl_keyfile=c["server.key"],
    )
    try:
        with httpx.Client(base_url=tls.url, verify=_trust(c)) as client:
            assert client.get("/v1/health/live").status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(tls.url.replace("https", "http") + "/v1/health/live", timeout=2)
    finally:
        stop_front(tls)
    mtls = _front(
        tmp_path,
        {"verify": _trust(c, client=True)},
        ssl_mode="mtls",
        ssl_certfile=c["server.pem"],
        ssl_keyfile=c["server.key"],
        ssl_ca_certs=c["ca.pem"],
    )
    try:
        with httpx.Client(base_url=mtls.url, verify=_trust(c, client=True)) as client:
            assert client.get("/v1/health/live").status_code == 200
        with (
            pytest.raises(httpx.HTTPError),
            httpx.Client(base_url=mtls.url, verify=_trust(c)) as anonymous,
        ):
            anonymous.get("/v1/health/live")
    finally:
        stop_front(mtls)


def test_tokenize_and_count_tokens_wait_for_a_slot_too(tmp_path: Path) -> None:
    front = _front(tmp_path, max_running=1, max_queue=0)
    try:
        results: list[object] = []
        thread = _stream_in_thread(front, results)
        deadline = time.monotonic() + 5
        while _metric(front, "num_requests_running") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with front.client() as c:
            r = c.post("/v1/tokenize", json={"model": MODEL, "prompt": "hello"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            r = c.post(
                "/v1/messages/count_tokens",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 503 and r.json()["type"] == "error"
        thread.join()
        with front.client() as c:  # with the slot free, both answer
            r = c.post("/v1/tokenize", json={"model": MODEL, "prompt": "hello"})
            assert r.status_code == 200
    finally:
        stop_front(front)
