"""Adversarial load against a real `inferd serve` on each engine (issue 16): OpenAI's published
OpenAPI document drives schemathesis at the operations inferd serves; a client stops reading a
stream it opened while others keep being served; a client gives up on a whole (non-streamed)
answer and its slot must come back.

Fuzzing. The document is the pinned one the conformance tests read (tests/conformance.py). Its
server is `https://api.openai.com/v1`, so its paths (`/chat/completions`) go to the front's
`/v1`. Only the operations inferd serves, and of those only what the served model's task offers
(a chat model has no `/embeddings`), are fuzzed, in both of schemathesis' modes: *positive*
(requests the document calls valid; they are aimed at the served model and keep only the fields
the document declares, so they reach deep into the front and on to the engine) and *negative*
(requests the document refuses). Each generated request is bounded before it is sent (`bound`):
at most `MAX_OUTPUT` tokens out, `n` and `best_of` at most 2, so a valid request costs the
engine a fraction of a second. Every answer must be a success, a 4xx in the OpenAI error
envelope, or a 502/503 in that envelope (rare: at most `MAX_UNAVAILABLE` of the calls); none
may take longer than `HANG_S`. Afterwards the service is still ready and answering, with the
same engine processes (never restarted). Failures are collected, not raised inside hypothesis,
so a bad answer is reported with its request instead of being shrunk against a live server for
minutes.

`benchmarks/adversarial.py` runs the same load with many more examples, plus header and
connection abuse, and reports what the service held (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx
import psutil
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.core.errors import UnsupportedSchema
from schemathesis.generation import GenerationMode

from inferd.catalog import Catalog
from tests.conformance import SPEC
from tests.e2e.conftest import MODEL, Served

pytestmark = pytest.mark.e2e

# OpenAI's operations inferd serves, and the model tasks that offer each.
GENERATION_TASKS = frozenset({"chat", "completion", "guard"})
OPERATIONS: dict[tuple[str, str], frozenset[str] | None] = {
    ("POST", "/chat/completions"): GENERATION_TASKS,
    ("POST", "/completions"): GENERATION_TASKS,
    ("POST", "/responses"): GENERATION_TASKS,
    ("POST", "/embeddings"): frozenset({"embedding"}),
    ("GET", "/models"): None,  # every model
    ("GET", "/models/{model}"): None,
}
MAX_OUTPUT = 8  # tokens a generated request may ask for
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
HANG_S = 60.0  # no single bounded request takes anywhere near this on either engine
MAX_UNAVAILABLE = 0.02  # share of calls that may end in a (well-formed) 502/503
EXAMPLES = 20  # per operation and mode: ~200 requests per engine


# --------------------------------------------------------------------------- the document


@cache
def openai_document() -> dict[str, Any]:
    """OpenAI's OpenAPI document, as published (no conversion: schemathesis reads 3.1)."""
    with gzip.open(SPEC, "rt", encoding="utf-8") as f:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc: dict[str, Any] = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    return doc


def served_operations(task: str) -> list[Any]:
    """The document's operations that inferd serves for a model of `task`."""
    schema = schemathesis.openapi.from_dict(openai_document())
    wanted = {key for key, tasks in OPERATIONS.items() if tasks is None or task in tasks}
    return [schema[path][method] for method, path in sorted(wanted)]


def declared_fields(operation: Any) -> frozenset[str]:
    """The top-level properties the document declares for an operation's JSON body."""
    doc = openai_document()
    body = operation.definition.raw.get("requestBody", {})
    media = body.get("content", {}).get("application/json", {})
    names: set[str] = set()
    todo = [media.get("schema", {})]
    while todo:
        node = todo.pop()
        ref = node.get("$ref")
        if isinstance(ref, str):
            node = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        names |= set(node.get("properties", {}))
        todo.extend(node.get("allOf", []))
    return frozenset(names)


# --------------------------------------------------------------------------- one case


def bound(case: Any, mode: GenerationMode) -> Any:
    """Make a generated request cheap for the engine, and aim valid ones at the served model.

    Output length and `n` are capped (a valid request without a length, or with a null one, gets
    one: left to the engine, a 135M model may write thousands of tokens). In positive mode the
    body keeps only the fields the document declares and names the served model, so it passes
    the front's checks of unknown fields and models and reaches what lies behind them. In
    negative mode a model named by some string becomes the served one too (a wrong type stays:
    it may be the mutation), or most invalid requests would stop at the first check, the
    model's name."""
    positive = mode is GenerationMode.POSITIVE
    if positive and "model" in (case.path_parameters or {}):
        case.path_parameters["model"] = MODEL
    body = case.body
    if not isinstance(body, dict):
        return case
    if positive:
        declared = declared_fields(case.operation)
        for name in [n for n in body if n not in declared]:
            del body[name]
        body["model"] = MODEL
    elif isinstance(body.get("model"), str):
        body["model"] = MODEL
    present = [n for n in LENGTH_FIELDS if n in body]
    for name in present:
        value = body[name]
        # null means "no limit" to the document as to the engines: left so, a 135M model given
        # garbage may write until its context is full (over a minute on a busy 2-core machine).
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value > MAX_OUTPUT
        ):
            body[name] = MAX_OUTPUT
    if not present and case.path != "/embeddings":
        body["max_output_tokens" if case.path == "/responses" else "max_tokens"] = MAX_OUTPUT
    for name in ("n", "best_of"):  # answers per prompt
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            body[name] = 2
    return case


@dataclass
class Outcome:
    """What one generated request got: an HTTP status, or `hung` / `dropped` / `unsendable`."""

    request: str  # method, path and (the start of) the body, to report it
    status: int | str
    seconds: float
    problem: str | None = None  # why the answer breaks the contract


def send(case: Any, base_url: str, timeout: float = HANG_S) -> Outcome:
    """Send one case and judge its answer against the contract (see the module docstring)."""
    request = _describe(case)
    started = time.monotonic()
    try:
        response = case.call(base_url=base_url, timeout=timeout)
    except requests.Timeout:
        return Outcome(request, "hung", time.monotonic() - started, "no answer")
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
        # The client library would not send it (a header no HTTP client can write).
        return Outcome(request, "unsendable", time.monotonic() - started)
    except requests.ConnectionError as exc:
        return Outcome(request, "dropped", time.monotonic() - started, str(exc))
    seconds = time.monotonic() - started
    status = response.status_code
    problem = None
    if seconds > timeout:
        problem = f"answered after {seconds:.1f} s"
    elif status >= 500 and status not in (502, 503):
        problem = f"{status}: {response.text[:300]}"
    elif status >= 400 and not _enveloped(response):
        problem = f"{status} outside the error envelope: {response.text[:300]}"
    return Outcome(request, status, seconds, problem)


def _enveloped(response: Any) -> bool:
    # schemathesis' Response: header values are lists, names as the server wrote them.
    types = [v for k, vs in response.headers.items() if k.lower() == "content-type" for v in vs]
    if not any("json" in t for t in types):
        return False
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def _describe(case: Any) -> str:
    body = case.body if isinstance(case.body, dict | list | str | bytes) else None
    text = json.dumps(body, default=repr)
    return f"{case.method} {case.path} {case.path_parameters or ''} {text[:400]}"


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    undrawn: int = 0  # examples schemathesis could not draw (see `fuzz`)

    def statuses(self) -> Counter[int | str]:
        return Counter(o.status for o in self.outcomes)

    def problems(self) -> list[str]:
        return [f"{o.request} -> {o.problem}" for o in self.outcomes if o.problem]

    def slowest(self, count: int) -> list[str]:
        ranked = sorted(self.outcomes, key=lambda o: -o.seconds)[:count]
        return [f"{o.seconds:.1f} s, {o.status}: {o.request}" for o in ranked]

    def unavailable(self) -> int:
        return sum(1 for o in self.outcomes if o.status in (502, 503))


def fuzz(operation: Any, mode: GenerationMode, base_url: str, tally: Tally, examples: int) -> None:
    """`examples` generated requests for one operation and mode, each judged into `tally`."""

    strategy = operation.as_strategy(generation_mode=mode)

    @given(data=st.data())
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],  # never shrink: a live server makes that minutes long
        suppress_health_check=list(HealthCheck),
    )
    def run(data: st.DataObject) -> None:
        try:
            case = data.draw(strategy)
        except UnsupportedSchema:
            # A negative case is drawn from a mutation of the document chosen at random, and
            # schemathesis cannot draw from a few of them (a `not` below the document root,
            # reached through a `$ref` it builds lazily, so the error escapes the draw instead
            # of being declined: schemathesis issue 4753's kind, still in 4.32.5). The draw is
            # counted, not sent, and the test fails if that is most of them.
            tally.undrawn += 1
            return
        tally.outcomes.append(send(bound(case, mode), base_url))

    run()


# --------------------------------------------------------------------------- the server


def engine_processes(served: Served) -> set[int]:
    """The server's direct children: its engine processes (a restart gives new ones)."""
    return {p.pid for p in psutil.Process(served.proc.pid).children()}


def metric(url: str, name: str) -> float:
    """The sum of a metric's series in the front's /v1/metrics."""
    total = 0.0
    for line in httpx.get(url + "/v1/metrics", timeout=10).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def answers_a_chat(url: str) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=HANG_S)
    return r.status_code == 200 and bool(r.json()["choices"])


@pytest.fixture(scope="module")
def before(server: Served) -> tuple[set[int], float]:
    """The engine processes and restart count before this module's abuse."""
    return engine_processes(server), metric(server.url, "inferd_engine_restarts")


# --------------------------------------------------------------------------- the tests


def test_openai_document_fuzzing(server: Served, before: tuple[set[int], float]) -> None:
    task = Catalog.load().get(MODEL).task
    operations = served_operations(task)
    assert len(operations) == 5  # chat: no /embeddings
    tally = Tally()
    for operation in operations:
        for mode in GenerationMode:
            fuzz(operation, mode, server.url + "/v1", tally, EXAMPLES)
    statuses = tally.statuses()
    problems = tally.problems()
    assert not problems, f"{len(problems)} broke the contract ({statuses}):\n" + "\n".join(
        problems[:10]
    )
    sent = len(tally.outcomes) - statuses["unsendable"]
    assert sent >= 8 * len(operations) * 2, statuses  # the fuzzing really ran
    assert tally.undrawn < len(tally.outcomes), (tally.undrawn, statuses)
    assert sum(n for s, n in statuses.items() if isinstance(s, int) and s < 300) >= 10, statuses
    unavailable = [f"{o.status}: {o.request}" for o in tally.outcomes if o.status in (502, 503)]
    assert len(unavailable) <= max(2, MAX_UNAVAILABLE * sent), (statuses, unavailable[:10])


# A long stream of big events (a few KB each with 20 logprobs: much to buffer if the front did).
STALLED_BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell a very long story."}],
    "max_tokens": 4000,
    "ignore_eos": True,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 20,
}


def test_a_client_that_stops_reading_a_stream(
    server: Served, before: tuple[set[int], float]
) -> None:
    """A stream whose client stops reading costs its own slot and little memory: others are
    served meanwhile (a slow header sender is cut at the default 10 s header limit, an
    oversized header refused), and once the client goes the slot is free again."""
    front = psutil.Process(server.proc.pid)
    rss_before = front.memory_info().rss
    body = STALLED_BODY
    with stalled_stream(server, body) as first:
        assert first.startswith(b"HTTP/1.1 200"), first[:300]
        assert metric(server.url, "num_requests_running") >= 1
        slow = SlowHeaders(server.port)
        rss_peak = rss_before
        started = time.monotonic()
        while time.monotonic() - started < 12:
            assert answers_a_chat(server.url)  # others are served meanwhile
            assert httpx.get(server.url + "/v1/health/ready", timeout=10).status_code == 200
            rss_peak = max(rss_peak, front.memory_info().rss)
            time.sleep(0.5)
        assert oversized_header_status(server.port) == 431
        slow.thread.join(timeout=5)
        assert slow.cut_after is not None and slow.cut_after < 12, slow.cut_after
    assert rss_peak - rss_before < 32 * 2**20, (rss_before, rss_peak)
    deadline = time.monotonic() + 10
    while metric(server.url, "num_requests_running") > 0:  # the slot goes with the client
        assert time.monotonic() < deadline, "the stalled stream's slot was never released"
        time.sleep(0.2)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(answers_a_chat(server.url)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_S)
    assert results == [True] * 4


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(
    server: Served, before: tuple[set[int], float]
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 1000,  # 6 s or more on either engine here: beyond the 4 s looked at
        "ignore_eos": True,
    }
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    gone = time.monotonic()
    # The front closes the engine connection when the client goes (proxy._unless_client_leaves),
    # so the engine stops generating and the slot comes back at once.
    while metric(server.url, "num_requests_running") > 0:
        assert time.monotonic() - gone < 4, "the slot outlived its client"
        time.sleep(0.2)


def test_still_serving_the_same_engine_afterwards(
    server: Served, before: tuple[set[int], float]
) -> None:
    assert httpx.get(server.url + "/v1/health/ready", timeout=10).status_code == 200
    assert answers_a_chat(server.url)
    processes, restarts = before
    assert engine_processes(server) == processes, "the engine was restarted"
    assert metric(server.url, "inferd_engine_restarts") == restarts


# --------------------------------------------------------------------------- raw clients


@contextlib.contextmanager
def stalled_stream(served: Served, body: dict[str, Any]) -> Iterator[bytes]:
    """A streamed POST on a raw socket with a small receive buffer: the first bytes of the
    answer are read, then nothing more until the block ends and the socket is closed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(HANG_S)
    try:
        sock.connect(("127.0.0.1", served.port))
        payload = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        first = b""
        while b"data:" not in first:
            chunk = sock.recv(4096)
            assert chunk, f"closed before the first event: {first[:300]!r}"
            first += chunk
        yield first
    finally:
        sock.close()


class SlowHeaders:
    """A client that sends a header byte every 0.5 s and never ends the header block; records
    how long the server took to answer or close (None while it still holds on)."""

    def __init__(self, port: int, limit_s: float = 30.0) -> None:
        self.cut_after: float | None = None
        self.thread = threading.Thread(target=self._run, args=(port, limit_s), daemon=True)
        self.thread.start()

    def _run(self, port: int, limit_s: float) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            sock.settimeout(0.5)
            while time.monotonic() - started < limit_s:
                try:
                    sock.sendall(b"x")
                    sock.recv(65536)  # an answer (408) or the close (b"")
                except TimeoutError:
                    continue
                except OSError:
                    pass
                self.cut_after = time.monotonic() - started
                return


def oversized_header_status(port: int, size: int = 1 << 20) -> int:
    """The status the server answers a header block of `size` bytes with (0: closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # it may refuse before all of it is sent
            sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * size)
            sock.sendall(b"\r\n\r\n")
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0
