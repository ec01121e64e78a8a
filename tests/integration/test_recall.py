"""A change of turn takes back what the old engine has not begun to answer: through the real
front, router and supervisors, over two recorded engines in real processes behind one model.

The first engine is the one for a single user, the second for a crowd (their speed tables say
so). A streamed request that the first engine holds unanswered (`hold`: its first event comes
after 1 s, as a long prompt's would) is taken back when the next request changes the turn: its
connection to the first engine is closed, and the second engine answers it whole, with nothing
recorded as a failure. A request the first engine has begun to answer stays there. The same on
llama.cpp and vLLM: tests/e2e/test_both_engines.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferd.catalog import Catalog
from inferd.server.routing import Router, Table
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import State, Supervisor
from tests.integration.conftest import (
    MODEL,
    Front,
    RecordedEngine,
    settings,
    start_front,
    stop_front,
)

pytestmark = pytest.mark.integration

# One user: the first engine finishes sooner (short prompts and steps alone); two or more: the
# second's rate is many times the first's (its steps stay flat), so the second request changes
# the turn.
ONE_USER = Table({128: 10.0}, {1: 1.0, 2: 100.0})
CROWD = Table({128: 100.0}, {1: 10.0, 2: 10.0})


class CrowdEngine(RecordedEngine):
    name = "recorded-crowd"  # its own name in the engines' listing and the metrics


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    entry = Catalog.load().get(MODEL)
    profile = entry.profile("vllm-cpu-bf16")
    assert profile is not None
    first = Supervisor(RecordedEngine(MODEL, tmp_path, profile, [], tmp_path), ready_timeout_s=20)
    later = Supervisor(
        CrowdEngine(MODEL, tmp_path, profile, [], tmp_path), ready_timeout_s=20, nice=10
    )
    served = ServedModel(
        entry,
        profile,
        first,
        "Apache License 2.0 (text)",
        {"source": {}},
        others=(Backend(profile, later),),
        combined="cpu-both",
        router=Router([ONE_USER, CROWD]),
    )
    f = start_front(served, settings(tmp_path))
    deadline = time.monotonic() + 20
    while later.state is not State.READY and time.monotonic() < deadline:
        time.sleep(0.05)
    assert later.state is State.READY
    yield f
    stop_front(f)


def _stream(front: Front, text: str) -> list[str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
        "stream": True,
    }
    with front.client(timeout=20) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line.startswith("data: ")]


def _engines(front: Front) -> dict[str, dict[str, int]]:
    with front.client() as c:
        listed = c.get("/v1/metadata").json()["models"][0]["engines"]
    return {e["name"]: {k: e[k] for k in ("requests", "recalled", "running")} for e in listed}


def _held(front: Front) -> int:
    """How many `hold` requests the first engine still works on (their client may be gone)."""
    with front.engine() as engine:
        return int(engine.get("/debug/open-streams").json()["held"])


@pytest.mark.parametrize("held", ["hold", "late"])
def test_a_change_of_turn_takes_back_what_the_old_engine_has_not_answered(
    front: Front, held: str
) -> None:
    """`hold`: nothing answered yet; `late`: the stream's headers sent, no event yet (what
    llama-server does while it computes the prompt): neither has begun to answer."""
    answers: dict[str, list[str]] = {}
    first = threading.Thread(target=lambda: answers.setdefault("held", _stream(front, held)))
    first.start()
    deadline = time.monotonic() + 5
    while _held(front) == 0 and time.monotonic() < deadline:  # the first engine has it
        time.sleep(0.01)
    assert _engines(front)["recorded"]["running"] == 1
    # A second user: the crowd's engine's turn. The held request is taken back from the first
    # engine (its connection closed: it stops holding it) and goes to the crowd's engine.
    answers["second"] = _stream(front, "hello")
    first.join(timeout=20)
    for events in answers.values():
        assert events[-1] == "data: [DONE]" and len(events) > 2  # whole, from its first event
    assert _held(front) == 0
    engines = _engines(front)
    assert engines["recorded"] == {"requests": 0, "recalled": 1, "running": 0}, engines
    assert engines["recorded-crowd"] == {"requests": 2, "recalled": 0, "running": 0}
    with front.client() as c:
        metrics = c.get("/v1/metrics").text
    labels = f'engine="recorded",model="{MODEL}"'
    assert f"inferd_engine_recalls_total{{{labels}}} 1.0" in metrics
    assert f"inferd_engine_requests_total{{{labels}}} 0.0" in metrics
    crowd = f'engine="recorded-crowd",model="{MODEL}"'
    assert f"inferd_engine_requests_total{{{crowd}}} 2.0" in metrics
    # One answer per request: the recalled try is recorded nowhere, nothing as a failure.
    assert _total(metrics, "request_success_total") == 2
    assert _total(metrics, "request_failure_total") == 0


def _total(metrics: str, name: str) -> float:
    """The sum of a counter's samples for the model, from the exposition text."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == MODEL
    )


def test_a_request_the_old_engine_has_begun_to_answer_stays(front: Front) -> None:
    answers: list[list[str]] = []
    first = threading.Thread(target=lambda: answers.append(_stream(front, "slow")))
    first.start()
    deadline = time.monotonic() + 5
    with front.engine() as engine:  # its first events are out: the stream has begun
        while engine.get("/debug/open-streams").json()["open"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    second = _stream(front, "hello")
    first.join(timeout=30)
    assert second[-1] == "data: [DONE]" and answers[0][-1] == "data: [DONE]"
    engines = _engines(front)
    # The stream stayed where it began. The second waited for the first engine's drain, and
    # then found itself alone (one user: the first engine's again) or, had the drain taken
    # longer than a change of turn waits, went to the crowd's engine.
    assert engines["recorded"]["recalled"] == 0 and engines["recorded"]["requests"] >= 1
    assert engines["recorded"]["requests"] + engines["recorded-crowd"]["requests"] == 2
