"""Forward an OpenAI request to its model's engine and relay the answer, streaming as it comes.

The front parses only what it must: the body must be a JSON object, `model` picks the engine,
`stream` picks the relay. Everything else is the engine's to validate (its 4xx come back in the
OpenAI envelope). Bytes go through unchanged, with one exception kept invisible to the client: a
streamed request that did not ask for usage gets `stream_options.include_usage` added, so the
token counters are exact, and the engine's final usage-only chunk is dropped on the way back.

Per-request state (timings, token counts, finish reason) lives in a `Call` object, never on the
shared `Proxy`. A client that disconnects closes the generator, which closes the engine
connection, which makes the engine abort the request and free its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from inferd.errors import EngineUnavailableError, InvalidRequestError
from inferd.observability.metrics import Metrics
from inferd.server.errors import envelope, from_engine
from inferd.server.served import ModelTable, ServedModel

log = logging.getLogger("inferd.requests")

# Markers looked for in raw event bytes, so that plain token events are never parsed.
_USAGE = b'"usage"'
_ERROR = b'{"error"'
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"]*)"')
_REQUEST_ID_MAX = 128


def request_id(request: Request) -> str:
    """The client's X-Request-Id when it is sane, else a new one; echoed back to the client."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= _REQUEST_ID_MAX and given.isprintable():
        return given
    return uuid.uuid4().hex


def parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return payload


def _stream_flag(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be true or false", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    if options is not None and not stream:
        raise InvalidRequestError(
            "stream_options is only allowed with stream=true", param="stream_options"
        )
    return stream


class Call:
    """One request's journey through the front: timings and counts for metrics and the log."""

    def __init__(
        self, model: str, metrics: Metrics, path: str, rid: str, counted: bool = True
    ) -> None:
        self.model = model
        # Only generation requests feed the request and token metrics (tokenize does not).
        self.counted = counted
        self.metrics = metrics
        self.path = path
        self.rid = rid
        # The engine gets an id of its own: clients may reuse theirs, engines need unique ones.
        self.engine_rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = "unknown"
        self.strip_usage = False
        self.engine_error = False  # the engine reported an error inside a 200 stream
        self._open = True
        if counted:
            metrics.requests_running.labels(self.model).inc()

    def read_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def observe_events(self, chunk: bytes) -> bytes:
        """Look at complete SSE events; returns what goes on to the client."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        reasons = _FINISH.findall(chunk)
        if reasons:
            self.finish_reason = reasons[-1].decode("ascii", "replace")
        if _USAGE not in chunk and _ERROR not in chunk:
            return chunk  # the common case: plain token events, forwarded untouched
        kept: list[bytes] = []
        for event in chunk.split(b"\n\n"):
            if not event:
                continue
            if _USAGE in event or _ERROR in event:
                try:
                    data = json.loads(event.removeprefix(b"data:"))
                except ValueError:
                    data = None  # not ours to judge; the client gets the event as it was
                if isinstance(data, dict):
                    self.engine_error |= "error" in data
                    usage = data.get("usage")
                    if isinstance(usage, dict):
                        self.read_usage(usage)
                        if self.strip_usage and data.get("choices") == []:
                            continue  # the usage chunk inferd asked for on the client's behalf
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def read_answer(self, body: bytes) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            return
        if isinstance(data, dict):
            self.read_usage(data.get("usage") or {})
            choices = data.get("choices") or [{}]
            self.finish_reason = str(choices[-1].get("finish_reason") or "unknown")

    def finish(self, status: int = 200) -> None:
        """Record the outcome once (success or failure) and release the running slot."""
        if not self._open:
            return
        self._open = False
        if self.engine_error and status < 400:
            status = 500
        now = time.perf_counter()
        if self.counted:
            self._record(status, now)
        log.info(
            "%s model=%s status=%d prompt_tokens=%d completion_tokens=%d ms=%.0f",
            self.path,
            self.model,
            status,
            self.prompt_tokens,
            self.completion_tokens,
            (now - self.started) * 1000,
            extra={"request_id": self.rid, "engine_request_id": self.engine_rid},
        )

    def _record(self, status: int, now: float) -> None:
        m, model = self.metrics, self.model
        m.requests_running.labels(model).dec()
        if status >= 400:
            m.request_failure.labels(model, str(status)).inc()
            return
        m.request_success.labels(model, self.finish_reason).inc()
        m.e2e.labels(model).observe(now - self.started)
        if self.prompt_tokens or self.completion_tokens:
            m.prompt_tokens.labels(model).inc(self.prompt_tokens)
            m.generation_tokens.labels(model).inc(self.completion_tokens)
            m.request_prompt_tokens.labels(model).observe(self.prompt_tokens)
            m.request_generation_tokens.labels(model).observe(self.completion_tokens)
        if self.first_token_at is not None:
            m.ttft.labels(model).observe(self.first_token_at - self.started)
            if self.completion_tokens > 1:
                per_token = (now - self.first_token_at) / (self.completion_tokens - 1)
                m.tpot.labels(model).observe(per_token)


class RelayResponse(StreamingResponse):
    """A streaming response that always releases the engine call, even if never iterated.

    When a client disconnects before the first byte, Starlette cancels the response without ever
    starting the body generator, so the generator's own clean-up would not run.
    """

    def __init__(
        self, content: AsyncIterator[bytes], *, on_close: Callable[[], object], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Proxy:
    def __init__(self, models: ModelTable, metrics: Metrics, log_requests: bool = False) -> None:
        self.models = models
        self.metrics = metrics
        self.log_requests = log_requests
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No pool limit: admission control decides how many requests reach an engine, not the
        # connection pool. No total timeout: a long generation is not an error.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: Request, engine_path: str, counted: bool = True) -> Response:
        body = await request.body()
        payload = parse_body(body)
        served = self.models.lookup(payload.get("model"))
        stream = _stream_flag(payload)
        served.require_ready()
        rid = request_id(request)
        if self.log_requests:
            log.info("request %s body: %s", rid, body.decode("utf-8", "replace"))
        call = Call(served.id, self.metrics, engine_path, rid, counted)
        if stream and not (payload.get("stream_options") or {}).get("include_usage"):
            payload["stream_options"] = {
                **(payload.get("stream_options") or {}),
                "include_usage": True,
            }
            body = json.dumps(payload).encode()
            call.strip_usage = True
        try:
            return await self._send(served, engine_path, body, stream, call)
        except asyncio.CancelledError:
            call.finish(499)  # the client went away while the engine was answering
            raise
        except BaseException:
            call.finish(502)
            raise

    async def _send(
        self, served: ServedModel, path: str, body: bytes, stream: bool, call: Call
    ) -> Response:
        assert self.session is not None
        url = served.supervisor.base_url + path
        headers = {"Content-Type": "application/json", "X-Request-Id": call.engine_rid}
        try:
            resp = await self.session.post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EngineUnavailableError(f"engine for {served.id} is unreachable: {exc}") from None
        out_headers = {"X-Request-Id": call.rid}
        if not stream or resp.status != 200:
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise EngineUnavailableError(
                    f"engine for {served.id} failed mid-answer: {exc}"
                ) from None
            finally:
                resp.release()
            if resp.status >= 400:
                call.finish(resp.status)
                return JSONResponse(from_engine(resp.status, data), resp.status, out_headers)
            call.read_answer(data)
            call.finish(resp.status)
            return Response(data, resp.status, out_headers, media_type=resp.content_type)

        def release() -> None:
            resp.close()
            call.finish(499)  # no-op when the relay already recorded how it ended

        return RelayResponse(
            self._relay(resp, call),
            media_type="text/event-stream",
            headers={**out_headers, "Cache-Control": "no-cache"},
            on_close=release,
        )

    async def _relay(self, resp: aiohttp.ClientResponse, call: Call) -> AsyncIterator[bytes]:
        """Pass complete SSE events on as soon as they arrive; never hold a finished event."""
        pending = b""
        status = 499  # if the generator is closed early, the client went away
        try:
            async for chunk in resp.content.iter_any():
                pending += chunk
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                complete, pending = pending[: end + 2], pending[end + 2 :]
                out = call.observe_events(complete)
                if out:
                    yield out
            if pending.strip():
                yield pending
            status = 200
        except (TimeoutError, aiohttp.ClientError) as exc:
            status = 502
            err = envelope(
                f"the engine stopped mid-stream: {exc}", "server_error", "engine_unavailable"
            )
            yield b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            resp.close()
            call.finish(status)
