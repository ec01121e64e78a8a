"""Engine error bodies become the OpenAI envelope; typed errors carry status and headers."""

from __future__ import annotations

import json

from inferd.errors import EngineNotReadyError, ModelNotFoundError
from inferd.server.errors import from_engine

# Bodies captured from vLLM 0.32.0's OpenAI server.
VLLM_VALIDATION = json.dumps(
    {
        "error": {
            "message": "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', "
            "'msg': 'Input should be a valid list', 'input': 'x'}",
            "type": "Bad Request",
            "param": "body.messages",
            "code": 400,
        }
    }
).encode()
VLLM_MAX_TOKENS = json.dumps(
    {
        "error": {
            "message": "max_tokens=100000 cannot be greater than max_model_len=8192. "
            "Please request fewer output tokens. (parameter=max_tokens, value=100000)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    }
).encode()


def test_vllm_validation_error_names_the_field() -> None:
    err = from_engine(400, VLLM_VALIDATION)["error"]
    assert err["param"] == "messages"
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_request"
    assert "valid list" in err["message"]


def test_vllm_bad_request_keeps_message() -> None:
    err = from_engine(400, VLLM_MAX_TOKENS)["error"]
    assert err["param"] == "max_tokens"
    assert err["message"].startswith("max_tokens=100000")


def test_non_json_engine_error_is_wrapped() -> None:
    err = from_engine(500, b"Internal Server Error")["error"]
    assert err == {
        "message": "Internal Server Error",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_starlette_detail_body() -> None:
    assert from_engine(404, b'{"detail":"Not Found"}')["error"]["message"] == "Not Found"


def test_typed_errors_carry_http_facts() -> None:
    assert ModelNotFoundError("x").status == 404
    assert ModelNotFoundError("x").code == "model_not_found"
    not_ready = EngineNotReadyError("starting", retry_after_s=7)
    assert not_ready.status == 503
    assert not_ready.headers() == {"Retry-After": "7"}
