"""Forward an OpenAI request to its model's engine and relay the answer, streaming as it comes.

In order, each step cheap before the next: refuse while draining; check the API key and its
limits; refuse an oversized body before reading it; parse the body (it must be a JSON object),
pick the model, check the input limits; check the engine is ready; wait for a slot (admission
control); then send the bytes on. Everything else is the engine's to validate (its 4xx come back
in the OpenAI envelope). Bytes go through unchanged, with one exception kept invisible to the
client: a streamed request that did not ask for usage gets `stream_options.include_usage` added,
so the token counters are exact, and the engine's usage-only chunk is dropped on the way back.

A client that disconnects closes the relay, which closes the engine connection, which makes the
engine abort the request and free its slot. At the drain deadline `abort_all` cuts the engine
connections still open; each stream then ends with an SSE error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from inferd.errors import (
    ContentFilterError,
    DrainingError,
    EngineUnavailableError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from inferd.guardrails.rails import Guardrails
from inferd.observability.metrics import Metrics
from inferd.server import limits, retrieval
from inferd.server.call import Call
from inferd.server.context import current_request_id
from inferd.server.errors import envelope, from_engine
from inferd.server.keys import KeyRecord, KeyRing
from inferd.server.retrieval import Shape
from inferd.server.served import ModelTable, ServedModel

log = logging.getLogger("inferd.requests")
ENGINE_KEEPALIVE_S = 4.0
# Request bodies above this size are checked by the input rails in a worker thread: PII
# detection takes about 1 ms per 2.5 KB, which would hold up every other stream.
GUARD_INLINE_BYTES = 64 * 1024


def _too_long(tokens: int, context: int, engine_said: str) -> str:
    return (
        f"the prompt has {tokens} tokens and the model's context is {context}; shorten the "
        f"prompt (nothing was truncated). Engine: {engine_said}"
    )


_DONE = b"data: [DONE]"


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
    def __init__(
        self,
        models: ModelTable,
        metrics: Metrics,
        *,
        keys: KeyRing | None = None,
        max_body_bytes: int = 4 * 2**20,
        log_requests: bool = False,
        guards: Guardrails | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        self.guards = guards  # inline rails, when a guardrails file turns some on
        self.session: aiohttp.ClientSession | None = None
        self.fresh: aiohttp.ClientSession | None = None
        self.draining = False
        self.active: set[Call] = set()
        self._idle: asyncio.Event | None = None  # set when draining and nothing is in flight

    async def open(self) -> None:
        # No pool limit: admission control decides how many requests reach an engine, not the
        # connection pool. No total timeout: a long generation is not an error.
        # Idle engine connections are dropped after 4 s, before the engines' own servers close
        # them (llama-server and uvicorn both after 5 s): reusing one they just closed fails.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        # Retries go out on a connection of their own, never a pooled one: when an engine has
        # closed one pooled connection it has often closed others (seen on a GPU, where a
        # retry on the pool failed again and turned a harmless race into a 502).
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        for session in (self.session, self.fresh):
            if session is not None:
                await session.close()

    # ------------------------------------------------------------------ guards

    def authorize(self, request: Request) -> KeyRecord | None:
        """The caller's key record (401/429 otherwise); None when no keys are configured."""
        if self.keys is None or not self.keys.active:
            return None
        record = self.keys.authenticate(request.headers.get("authorization"))
        self.keys.admit(record)
        return record

    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLargeError(
                f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:  # chunked bodies declare no length
                raise PayloadTooLargeError(
                    f"request body exceeds the limit of {self.max_body_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ forwarding

    async def forward(
        self,
        request: Request,
        engine_path: str,
        counted: bool = True,
        shape: Shape | None = None,
    ) -> Response:
        if self.draining:
            raise DrainingError("the service is shutting down; retry on another replica")
        key = self.authorize(request)
        body = await self.read_body(request)
        payload = parse_body(body)
        served = self.models.lookup(payload.get("model"))
        retrieval.check_route(served.entry, engine_path, request.url.path)
        stream = _stream_flag(payload)
        engine = served.supervisor.engine
        reshape_answer = None
        if shape is not None:
            # NIM's request format in the engine's terms (see server.retrieval).
            payload, reshape_answer = shape(payload, served.entry)
        limits.check(
            engine_path,
            payload,
            context=engine.context,
            accepted=engine.accepted_params(engine_path),
            engine=engine.name,
            max_n=engine.max_n,
        )
        served.require_ready()
        guarded = False
        if self.guards is not None:
            # Long texts: the PII rail off the event loop.
            offload = len(body) > GUARD_INLINE_BYTES
            guarded = await self.guards.guard_request(engine_path, payload, offload)
        rid = current_request_id()
        if self.log_requests:  # what the engine gets: after the input rails
            shown = json.dumps(payload) if guarded else body.decode("utf-8", "replace")
            log.info("request body: %s", shown)
        slot = await served.admission.acquire() if counted else None
        call = Call(served.id, self.metrics, engine_path, rid, slot=slot, key=key, keys=self.keys)
        call.reshape_answer = reshape_answer
        self.active.add(call)
        # The body is re-encoded once, and only when something in it had to change.
        renamed = [ours for ours in engine.param_aliases if ours in payload]
        for ours in renamed:
            payload[engine.param_aliases[ours]] = payload.pop(ours)
        rewritten = bool(renamed) or shape is not None or guarded
        if stream and not (payload.get("stream_options") or {}).get("include_usage"):
            payload["stream_options"] = {
                **(payload.get("stream_options") or {}),
                "include_usage": True,
            }
            call.strip_usage = rewritten = True
        if engine_path in engine.adapted_routes:
            body = json.dumps(engine.adapt(engine_path, payload)).encode()
        elif rewritten:
            body = json.dumps(payload).encode()
        call.adapt_event = engine.event_adapter(engine_path)
        if self.guards is not None and stream:
            call.stream_filter = self.guards.stream_filter(engine_path, payload)
        try:
            return await self._send(served, engine_path, body, stream, call, payload)
        except asyncio.CancelledError:
            self._end(call, 499)  # the client went away while the engine was answering
            raise
        except DrainingError:
            self._end(call, 503)
            raise
        except BaseException:
            self._end(call, 502)
            raise

    def _end(self, call: Call, status: int) -> None:
        call.finish(status)
        self.active.discard(call)
        if not self.active and self._idle is not None:
            self._idle.set()

    async def _send(
        self,
        served: ServedModel,
        path: str,
        body: bytes,
        stream: bool,
        call: Call,
        payload: dict[str, Any],
    ) -> Response:
        assert self.session is not None and self.fresh is not None
        url = served.supervisor.base_url + path
        headers = {"Content-Type": "application/json", "X-Request-Id": call.engine_rid}
        try:
            try:
                resp = await self.session.post(url, data=body, headers=headers)
            except aiohttp.ClientConnectionError as first:
                # A kept-alive connection the engine closed just as it was reused: nothing was
                # answered, so send once more, on a fresh connection. llama-server does this to
                # 5-25% of requests at 12-16 streams (benchmarks/RESULTS.md), whatever its
                # number of HTTP threads.
                log.info("engine connection failed before an answer (%s); retrying once", first)
                resp = await self.fresh.post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            served.supervisor.report_failure(f"a request could not reach the engine: {exc}")
            raise EngineUnavailableError(f"engine for {served.id} is unreachable: {exc}") from None
        call.upstream = resp
        if not stream or resp.status != 200:
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                if call.abort_reason:
                    raise DrainingError(call.abort_reason) from None
                served.supervisor.report_failure(f"the engine failed mid-answer: {exc}")
                raise EngineUnavailableError(
                    f"engine for {served.id} failed mid-answer: {exc}"
                ) from None
            finally:
                resp.release()
            if resp.status >= 400:
                # An engine's own server error is, seen from the front, a failed upstream: 502.
                status = 502 if resp.status >= 500 else resp.status
                self._end(call, status)
                error = from_engine(status, data)
                counts = served.supervisor.engine.prompt_too_long(data)
                if counts is not None:  # the engine counted the whole prompt itself
                    error["error"]["message"] = _too_long(*counts, error["error"]["message"])
                elif status == 400 and b"maximum context length" in data:
                    await self._count_prompt(served, body, error)
                return JSONResponse(error, status)
            if path in served.supervisor.engine.adapted_routes:
                with contextlib.suppress(ValueError):
                    adapted = served.supervisor.engine.adapt_answer(path, json.loads(data))
                    data = json.dumps(adapted).encode()
            else:
                data = call.adapt_body(data)
            answer = call.read_answer(data)
            guard = self.guards is not None and self.guards.reads_answers(path)
            if answer is not None and (call.reshape_answer is not None or guard):
                # Parsed once above; re-encoded once for both.
                if call.reshape_answer is not None:
                    answer = call.reshape_answer(answer)
                if guard:
                    answer = await self._guard_answer(path, payload, answer, call)
                data = json.dumps(answer).encode()
            self._end(call, resp.status)
            return Response(data, resp.status, media_type=resp.content_type)

        def release() -> None:
            resp.close()
            self._end(call, 499)  # a no-op when the relay already recorded how it ended

        return RelayResponse(
            self._relay(resp, call, served),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            on_close=release,
        )

    async def _guard_answer(
        self, path: str, request: dict[str, Any], answer: dict[str, Any], call: Call
    ) -> dict[str, Any]:
        assert self.guards is not None
        try:
            guarded = await self.guards.guard_answer(path, request, answer)
        except ContentFilterError:
            call.finish_reason = "content_filter"
            self._end(call, 400)
            raise
        choices = guarded.get("choices") or []
        if any(isinstance(c, dict) and c.get("finish_reason") == "content_filter" for c in choices):
            call.finish_reason = "content_filter"
        return guarded

    async def _count_prompt(self, served: ServedModel, body: bytes, error: dict[str, Any]) -> None:
        """Add the prompt's real token count to a too-long error: engines stop counting at the
        limit ("at least 8193"), and a user deciding how much to cut needs the real number."""
        assert self.session is not None
        payload = json.loads(body)
        query: dict[str, Any] = {"model": payload["model"]}
        texts = payload.get("input")
        if isinstance(payload.get("prompt"), str):
            query["prompt"] = payload["prompt"]
        elif isinstance(payload.get("messages"), list):
            query.update(messages=payload["messages"], add_generation_prompt=True)
        elif isinstance(texts, str | list) and texts:
            await self._count_inputs(served, query, texts, error)
            return
        else:
            return
        counted = await self._token_count(served, query)
        if counted is not None:
            error["error"]["message"] = _too_long(*counted, error["error"]["message"])

    async def _token_count(
        self, served: ServedModel, query: dict[str, Any]
    ) -> tuple[int, int] | None:
        """(tokens, the model's context) from the engine's tokenizer; None if it cannot say."""
        assert self.session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            async with self.session.post(
                served.supervisor.base_url + "/tokenize",
                json=query,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                counted = await resp.json()
                return int(counted["count"]), int(counted["max_model_len"])
        return None

    async def _count_inputs(
        self, served: ServedModel, query: dict[str, Any], texts: str | list[Any], error: Any
    ) -> None:
        """The same for embeddings: the longest text input, by index, with NIM's way out."""
        inputs = [texts] if isinstance(texts, str) else texts
        longest: tuple[int, int, int] | None = None  # tokens, index, context
        for index, text in enumerate(inputs[:256]):
            if not isinstance(text, str):
                return
            counted = await self._token_count(served, {**query, "prompt": text})
            if counted is None:
                return
            if longest is None or counted[0] > longest[0]:
                longest = (counted[0], index, counted[1])
        if longest is None:
            return
        tokens, index, context = longest
        which = "the input" if isinstance(texts, str) else f"input[{index}]"
        error["error"]["message"] = (
            f"{which} has {tokens} tokens and the model's context is {context}; shorten it, or "
            "send truncate=END (or START) to cut it to fit (nothing was truncated). "
            f"Engine: {error['error']['message']}"
        )
        error["error"]["param"] = "input"

    async def _relay(
        self, resp: aiohttp.ClientResponse, call: Call, served: ServedModel
    ) -> AsyncIterator[bytes]:
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
                stop = False
                if call.stream_filter is not None:
                    out, stop = await call.stream_filter.process(out)
                    if stop:
                        call.finish_reason = "content_filter"
                if _DONE in out:
                    # The answer is complete: a client that hangs up now has what it asked for.
                    status = 200
                if out:
                    yield out
                if stop:
                    return  # an output rail ended the stream; `finally` closes the engine's
            if pending.strip():
                if call.stream_filter is not None:  # a last event without its blank line
                    pending, stop = await call.stream_filter.process(pending + b"\n\n")
                    if stop:
                        call.finish_reason = "content_filter"
                yield pending
            if call.stream_filter is not None and not call.stream_filter.blocked:
                # Ended without [DONE]: what the rails still hold is judged and sent now.
                tail = await call.stream_filter.finish()
                if call.stream_filter.blocked:
                    call.finish_reason = "content_filter"
                if tail:
                    yield tail
            status = 200
        except (TimeoutError, aiohttp.ClientError) as exc:
            if call.abort_reason:
                status, err = 503, envelope(call.abort_reason, "server_error", "shutting_down")
            else:
                reason = f"the engine stopped mid-stream: {exc}"
                served.supervisor.report_failure(reason)
                status, err = 502, envelope(reason, "server_error", "engine_unavailable")
            yield b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            resp.close()
            self._end(call, status)

    # ------------------------------------------------------------------ drain

    async def drain(self, timeout_s: float) -> int:
        """Stop taking requests, let those in flight finish for `timeout_s`, then cut the rest.
        Returns how many were cut."""
        self.draining = True
        self._idle = asyncio.Event()
        if not self.active:
            self._idle.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        cut = list(self.active)
        for call in cut:
            call.abort(
                f"the service shut down before this request finished (drain timeout "
                f"{timeout_s:g} s)"
            )
        # Give each relay a moment to send its error event and close.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 2.5)
        return len(cut)
