"""Fuzzing the front with schemathesis, from its own OpenAPI document, bounded in examples.

Every generated request must get either a success or an error in the OpenAI envelope, and no
5xx other than the documented 502/503; afterwards the service must still be ready and answer.
The engine is the recorded one, so the fuzzing hits the front's own input handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.conftest import (
    MODEL,
    Front,
    served_model,
    start_front,
    stop_front,
)
from tests.integration.conftest import settings as front_settings


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("fuzz")
    front = start_front(served_model(tmp), front_settings(tmp, max_queue=256))
    front.wait_ready()
    yield front
    stop_front(front)


def _fuzz_operation(operation: Any, url: str, calls: list[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def run(case: Any) -> None:
        response = case.call(base_url=url, timeout=30)
        calls.append(response.status_code)
        assert response.status_code < 500 or response.status_code in (502, 503), (
            case.method,
            case.path,
            response.status_code,
            response.text[:300],
        )
        if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
            error = response.json().get("error")
            assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)

    run()


def test_no_undocumented_server_errors(fuzzed: Front) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    results: list[Any] = list(schema.get_all_operations())
    operations = [result.ok() for result in results]
    assert len(operations) >= 12
    calls: list[int] = []
    for operation in operations:
        _fuzz_operation(operation, fuzzed.url, calls)
    assert len(calls) >= 10 * len(operations)  # the fuzzing really ran


def test_still_serving_after_the_fuzzing(fuzzed: Front, tmp_path: Path) -> None:
    with httpx.Client(base_url=fuzzed.url, timeout=10) as c:
        assert c.get("/v1/health/ready").status_code == 200
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
