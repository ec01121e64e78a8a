"""Log lines: JSON when asked, and the request id on every line written while serving one."""

from __future__ import annotations

import json
import logging

from inferd.observability.logs import JsonFormatter, RequestIdFilter, TextFormatter, request_id_var


def _record(message: str) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "inferd.test", "levelname": "INFO", "msg": message, "engine_request_id": "abc-1"}
    )
    RequestIdFilter().filter(record)
    return record


def test_json_line_carries_the_request_id_and_extra_fields() -> None:
    token = request_id_var.set("req-7")
    try:
        line = JsonFormatter().format(_record("done"))
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "req-7"
    assert entry["msg"] == "done"
    assert entry["engine_request_id"] == "abc-1"
    assert entry["level"] == "info"


def test_text_line_outside_a_request_has_no_id() -> None:
    line = TextFormatter("%(message)s").format(_record("idle"))
    assert line == "idle"
