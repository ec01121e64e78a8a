"""Serve one request of a forwarded route (`server.routes`): checks, rails, admission, then the
model's engine through its `EngineClient`, and the answer back in the route's own API.

In order, each step cheap before the next: refuse while draining; check the API key and its
limits; refuse an oversized body before reading it; parse the body (it must be a JSON object),
pick the model; a translated route (Responses, Messages) turns the request into chat
completions here, so everything after is the same for every generation route; check the input
limits and that the engine is ready; the input rails; wait for a slot (admission control); then
send the bytes on. Everything else is the engine's to validate (its 4xx come back in the route's
error envelope). Bytes go through unchanged where nothing has to change, with one exception kept
invisible to the client: a streamed request that did not ask for usage gets
`stream_options.include_usage` added, so the token counters are exact, and the engine's
usage-only chunk is dropped on the way back.

A client that disconnects closes the relay, which closes the engine connection, which makes the
engine abort the request and free its slot. At the drain deadline `drain` cuts the engine
connections still open; each stream then ends with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from inferd.catalog.schema import tool_refusal
from inferd.engines.base import Engine
from inferd.errors import (
    ContentFilterError,
    DrainingError,
    EngineUnavailableError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from inferd.guardrails.rails import Guardrails
from inferd.observability.metrics import Metrics
from inferd.server import limits, retrieval, routing
from inferd.server.adapters import Adapters, ServedAdapter
from inferd.server.admission import Recall, Want
from inferd.server.apis import conform, schemas
from inferd.server.apis.translation import Translation
from inferd.server.call import Call
from inferd.server.context import current_request_id
from inferd.server.engine_client import EngineClient, EngineSessions
from inferd.server.engine_stream import EngineStream
from inferd.server.errors import anthropic_body
from inferd.server.keys import KeyRecord, KeyRing
from inferd.server.relay import AnswerTooLargeError, Relay, RelayResponse, read_bounded
from inferd.server.served import ModelTable, ServedModel

if TYPE_CHECKING:  # routes names the proxy's handlers; the proxy only reads a Route
    from inferd.server.routes import Route

log = logging.getLogger("inferd.requests")
_T = TypeVar("_T")
# An engine's answer: a whole one on a pooled connection, or a stream on its own.
Answer = aiohttp.ClientResponse | EngineStream
# Request bodies above this size are checked by the input rails in their worker threads: PII
# detection takes up to about 15 ms per KiB of digit-dense text, which would hold up every
# other stream; below it, the thread hop costs more than the check.
GUARD_INLINE_BYTES = 1024
CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
# How often a recalled request asks its engine whether it still computes its prompt
# (`_linger`); the first ask waits this long too, for the engine to have taken the request in.
LINGER_ASK_S = 0.02


def parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(payload):
        # JSON's grammar lets `\ud886` stand alone; no engine can take it (llama-server fails
        # on it, and the answer could not be written back as UTF-8). The same 400 everywhere.
        raise InvalidRequestError(
            "request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff without "
            "its pair), which is not a character; send valid Unicode"
        )
    return payload


# A surrogate escape (paired or not): only then is the parsed body searched for a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: object) -> bool:
    """Whether a string anywhere in the parsed body (keys too) holds a lone surrogate (json
    joins the escapes of a valid pair into one character)."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


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


def _check(
    path: str,
    payload: dict[str, Any],
    served: ServedModel,
    engine: Engine,
    translation: Translation | None,
) -> None:
    """The request's limits, and its tools against what the engine honours for this model
    (refused, never dropped), named as the client named them."""
    try:
        limits.check(
            path,
            payload,
            context=engine.context,
            accepted=engine.accepted_params(path),
            engine=engine.name,
            max_n=engine.max_n,
        )
        if path == CHAT_PATH:
            schemas.check_chat_tools(payload)
            refusal = tool_refusal(served.id, engine.profile, payload)
            if refusal is not None:
                raise InvalidRequestError(refusal[0], param=refusal[1])
    except InvalidRequestError as exc:
        if translation is not None:
            exc.param = translation.client_param(exc.param)
        raise


def _lanes(
    path: str,
    payload: dict[str, Any],
    served: ServedModel,
    clients: list[EngineClient],
    translation: Translation | None,
) -> frozenset[int] | None:
    """The engines (lanes) that can serve the request, for a model with several: those whose
    checks it passes (a tool choice only vLLM honours goes to vLLM); the first engine's refusal
    when none can. None (any) for a model with one engine, after its checks."""
    if len(clients) == 1:
        _check(path, payload, served, clients[0].engine, translation)
        return None
    passed, refusal = [], None
    for lane, client in enumerate(clients):
        try:
            _check(path, payload, served, client.engine, translation)
        except InvalidRequestError as exc:
            refusal = refusal or exc
            continue
        passed.append(lane)
    if not passed:
        assert refusal is not None
        raise refusal
    return frozenset(passed)


# OpenAI's published default for a completion's `max_tokens`. Without it llama-server generates
# until its context is full, and vLLM reads an explicit null the same way: one request would hold
# a slot for thousands of tokens nobody asked for (a request that hung the adversarial suite).
COMPLETION_MAX_TOKENS = 16


def _default_max_tokens(path: str, payload: dict[str, Any]) -> bool:
    """Give a completion without `max_tokens` (or with null) OpenAI's default; True if set."""
    if path != COMPLETION_PATH or payload.get("max_tokens") is not None:
        return False
    payload["max_tokens"] = COMPLETION_MAX_TOKENS
    return True


async def _unless_client_leaves(
    request: Request, work: Coroutine[Any, Any, Response]
) -> Response | None:
    """`work`'s answer, or None once the client disconnects first. A whole (non-streamed) answer
    gives the client nothing to read until it is done, so nothing else would notice a client
    that gave up: the engine would generate for nobody and the request keep its admission slot
    to the end. Cancelling `work` closes the engine connection, which makes the engine abort."""
    task = await _before(work, _disconnected(request))
    return None if task is None else task.result()


async def _before(
    work: Coroutine[Any, Any, _T], rival: Coroutine[Any, Any, object]
) -> asyncio.Task[_T] | None:
    """`work`'s task if it is done before `rival` returns (or with it), else None: then `work`
    was cancelled and has ended. The loser is cancelled either way."""
    task = asyncio.ensure_future(work)
    other = asyncio.ensure_future(rival)
    try:
        await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the caller itself is cancelled
        other.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class Recalled(Exception):
    """A change of turn took the request back before its engine answered
    (`server.admission`): it waits for a slot again."""


async def _unless_recalled(post: Coroutine[Any, Any, _T], recall: Recall) -> _T:
    """`post`'s response, or `Recalled` once `recall` is set first (the engine connection is
    closed). A response that came as the recall did wins: the engine has begun to answer."""
    task = await _before(post, recall.wait())
    if task is None:
        raise Recalled
    return task.result()


async def _linger(client: EngineClient, served: ServedModel, lane: int, recall: Recall) -> None:
    """Hold a recalled request's slot while its engine may still compute its prompt
    (`server.admission`): an engine that says what it works on (llama.cpp's slots) is asked
    until it works on no more than admission has `kept` on it, for as long as a change of turn
    waits for a drain (the model's `Router.turn_wait_s`); one that does not say is given
    `recall.linger_s`, the bound from its prompt speed alone.

    Not that bound for an engine that says: the bound is the prompt's time alone, and a slot
    given back before the engine is done lets the crowd's engine start beside it, after which
    neither is alone. Measured on a 2-core Zen 5: a wave of eight's first request, recalled
    from llama.cpp as llama-server took it in, had its slot back after the 0.14 s bound
    while llama-server still computed its 120-token prompt (it answers its slots only between
    batches); vLLM's eight began beside it, and the prompt took 7 s, the wave 7.6 s instead of
    3.7. An answer that does not come in time (None) is asked again."""
    loop = asyncio.get_running_loop()
    if client.engine.working_path is None:
        await asyncio.sleep(recall.linger_s)
        return
    assert served.router is not None  # only a model with several engines recalls
    end = loop.time() + served.router.turn_wait_s
    while (left := end - loop.time()) > 0:
        await asyncio.sleep(min(LINGER_ASK_S, left))
        try:
            working = await asyncio.wait_for(client.working(), max(0.0, end - loop.time()))
        except TimeoutError:
            return
        if working is not None and working <= served.admission.kept(lane):
            return


async def _first_unless_recalled(resp: EngineStream, recall: Recall) -> bytes:
    """A stream's first bytes, or `Recalled` (the engine connection closed) if `recall` is set
    first. An engine may send a stream's headers at once (llama-server does, within a few
    ms) and its first event only with the first token: until that event it has not begun to
    answer. A recall that came with the first bytes still takes the request back: nothing has
    reached its client, and the crowd's engine would otherwise wait for the whole answer.
    Nothing once no recall can come any more (`Recall.until`: a long prompt's stream goes on
    to the relay, which watches its client), nor from a read that fails (the relay meets the
    failure and reports it)."""

    async def recalled() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recall.wait(), max(0.0, recall.until - time.monotonic()))

    try:
        task = await _before(resp.readany(), recalled())
    except (TimeoutError, aiohttp.ClientError):
        return b""
    if recall.is_set():
        resp.close()
        raise Recalled
    if task is None:
        return b""
    try:
        return task.result()
    except (TimeoutError, aiohttp.ClientError):
        return b""


@dataclass
class Prepared:
    """A request checked, through its input rails and translated, before any engine: what
    each try at an engine starts from (a recalled request tries again)."""

    route: Route
    served: ServedModel
    model_id: str  # what the client named (the adapter's id for an adapter)
    adapter: ServedAdapter | None
    key: KeyRecord | None
    body: bytes  # as the client sent it
    payload: dict[str, Any]  # the request in the client's terms, after rails and translation
    stream: bool
    rewritten: bool  # payload no longer says what body says
    translation: Translation | None
    reshape_answer: Callable[[dict[str, Any]], dict[str, Any]] | None
    want: Want


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects. The body is read whole by now, so the server's next
    message for this request can only be `http.disconnect` (it blocks until then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
        translations: dict[str, Any] | None = None,
        engine_read_timeout_s: float | None = None,
        max_answer_bytes: int = 64 * 2**20,
        adapters: Adapters | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        self.guards = guards  # inline rails, when a guardrails file turns some on
        # What translated routes need besides the request (the Responses store), by keyword.
        self.translations = translations or {}
        self.sessions = EngineSessions(engine_read_timeout_s)
        self.max_answer_bytes = max_answer_bytes
        self.adapters = adapters or Adapters()  # LoRA adapters by id (server.adapters)
        # One client per engine of each model, in lane order (`ServedModel.backends`).
        self.clients = {
            m.id: [EngineClient(m, self.sessions, b.supervisor) for b in m.backends] for m in models
        }
        self.draining = False
        self.active: set[Call] = set()
        self._idle: asyncio.Event | None = None  # set when draining and nothing is in flight

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self.sessions.pool

    async def open(self) -> None:
        await self.sessions.open()

    async def close(self) -> None:
        await self.sessions.close()

    def client(self, model: str, lane: int = 0) -> EngineClient:
        return self.clients[model][lane]

    # ------------------------------------------------------------------ guards

    def authorize(self, request: Request) -> KeyRecord | None:
        """The caller's key record (401/429 otherwise); None when no keys are configured.
        Anthropic's clients send their key as `x-api-key`, OpenAI's as a bearer token."""
        # Once started with keys, never open again: no keys left means no access (fail closed).
        if self.keys is None or not self.keys.required:
            return None
        header = request.headers.get("authorization")
        if header is None and "x-api-key" in request.headers:
            header = "Bearer " + request.headers["x-api-key"]
        record = self.keys.authenticate(header)
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

    async def forward(self, request: Request, route: Route) -> Response:
        if self.draining:
            raise DrainingError("the service is shutting down; retry on another replica")
        key = self.authorize(request)
        body = await self.read_body(request)
        payload = parse_body(body)
        adapter = self.adapters.find(payload.get("model"))
        served = adapter.base if adapter else self.models.lookup(payload.get("model"))
        model_id = adapter.name if adapter else served.id  # what the client named
        with served.admission.arriving() as close:  # counted in the load from here
            path = route.engine_path
            translation: Translation | None = None
            if route.translation is not None:
                # Another API onto chat completions: from here on, a chat request like any other.
                translation = route.translation.create(payload, model_id, **self.translations)
                payload = translation.request()
            retrieval.check_route(served.entry, path, request.url.path)
            stream = _stream_flag(payload)
            clients = self.clients[served.id]
            reshape_answer = None
            if route.shape is not None:
                # NIM's request format in the engine's terms (see server.retrieval).
                payload, reshape_answer = route.shape(payload, served.entry)
            lanes = _lanes(path, payload, served, clients, translation)
            await self.adapters.gate(served)  # while its engine restarts for new adapters
            served.require_ready()
            guarded = False
            if self.guards is not None:
                # Long texts: the PII rail off the event loop.
                offload = len(body) > GUARD_INLINE_BYTES
                guarded = await self.guards.guard_request(route.text, payload, offload)
            defaulted = _default_max_tokens(path, payload)
            rewritten = guarded or defaulted or route.shape is not None or translation is not None
            job = Prepared(
                route=route,
                served=served,
                model_id=model_id,
                adapter=adapter,
                key=key,
                body=body,
                payload=payload,
                stream=stream,
                rewritten=rewritten,
                translation=translation,
                reshape_answer=reshape_answer,
                # A model with several engines gives the slot of the one that will finish the
                # request soonest (`server.routing`), by its size; the routes no metric counts
                # (tokenize) compute next to nothing and stay outside the engines' turns.
                want=routing.want_of(payload, len(body), lanes, turns=route.counted),
            )
            if len(clients) > 1:
                # Let the requests that arrived with this one reach this point too, so that the
                # router sees a burst whole (each runs from its arrival to here without a pause
                # otherwise, the first judged as one user alone while the others are unread).
                await served.admission.gathered(close, job.want)
        again = False
        while True:
            try:
                return await self._dispatch(request, job, again)
            except Recalled:  # its engine's turn ended before it answered: in line again
                again = True

    async def _dispatch(self, request: Request, job: Prepared, again: bool) -> Response:
        """One try at an engine: a slot (`again`: first in line, for a recalled request), the
        request in that engine's terms, then the answer. Raises `Recalled` when a change of turn
        takes the request back before its engine answered (admission's docstring)."""
        served, route, path = job.served, job.route, job.route.engine_path
        clients = self.clients[served.id]
        several = len(clients) > 1
        # Every route waits for a slot (tokenize too: it runs on the engine like the rest), and
        # with models on demand for its model to load first.
        await self.adapters.gate(served)  # while its engine restarts for new adapters
        slot = await served.acquire(job.want, again=again)
        client = clients[slot.lane]
        engine = client.engine
        # The engines change the request in their own terms: each try starts from the client's.
        payload = copy.deepcopy(job.payload) if several else job.payload
        try:
            # After the rails (they read the client's terms) and once the engine is known.
            adapted = engine.adapt_request(path, payload)
        except BaseException:
            slot.release()
            raise
        recall = slot.recallable(streamed=job.stream) if several else None
        rewritten = job.rewritten or adapted
        if self.log_requests:  # what the engine gets: after the input rails
            shown = json.dumps(payload) if rewritten else job.body.decode("utf-8", "replace")
            log.info("request body: %s", shown)
        if job.adapter is not None:  # after the slot: its engine is not restarting under it
            slot = job.adapter.use(slot, engine, payload)
            rewritten = True
        elif self.adapters.plain(engine, payload):
            rewritten = True
        call = Call(
            job.model_id,
            self.metrics,
            path,
            current_request_id(),
            slot=slot,
            key=job.key,
            keys=self.keys,
            counted=route.counted,
        )
        call.recall = recall
        call.reshape_answer = job.reshape_answer
        self.active.add(call)
        if job.stream and not (payload.get("stream_options") or {}).get("include_usage"):
            payload["stream_options"] = {
                **(payload.get("stream_options") or {}),
                "include_usage": True,
            }
            call.strip_usage = rewritten = True
        body = client.encode(path, payload, None if rewritten else job.body)
        call.adapt_event = engine.event_adapter(path)
        if self.guards is not None and job.stream:
            call.stream_filter = self.guards.stream_filter(route.text, payload)
        try:
            send = self._send(client, route, body, job.stream, call, payload, job.translation)
            if job.stream:  # the relay watches the client from here (see RelayResponse)
                return await send
            answer = await _unless_client_leaves(request, send)
            if answer is None:  # nobody reads it; the engine connection is closed already
                self._end(call, 499)
                return Response(status_code=499)
            return answer
        except Recalled:
            log.debug("request recalled from %s at a change of turn", engine.name)
            self.metrics.engine_recalls.labels(served.id, engine.name).inc()
            assert call.recall is not None  # only a recallable try is recalled
            try:  # its slot is held while the engine may still compute its prompt
                await _linger(client, served, slot.lane, call.recall)
            finally:
                call.withdraw()
                self._gone(call)
            raise
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
        self._gone(call)

    def _gone(self, call: Call) -> None:
        self.active.discard(call)
        if not self.active and self._idle is not None:
            self._idle.set()

    async def _send(
        self,
        client: EngineClient,
        route: Route,
        body: bytes,
        stream: bool,
        call: Call,
        payload: dict[str, Any],
        translation: Translation | None,
    ) -> Response:
        path = route.engine_path
        resp = await self._post(client, path, body, call, stream)
        call.upstream = resp
        if isinstance(resp, EngineStream) and resp.status == 200:
            relay = Relay(call, translation, self.max_answer_bytes)
            return RelayResponse(
                resp, relay, client.supervisor, self._end, headers={"Cache-Control": "no-cache"}
            )
        # A whole answer, or a stream the engine refused (its error, read whole).
        data = await self._read(resp, call, client)
        if resp.status >= 400:
            # An engine's own server error is, seen from the front, a failed upstream: 502.
            status = resp.status
            if status >= 500:
                status = 400 if client.engine.clients_fault(status, data) else 502
                if status == 502:  # the engine's own words, for whoever reads the log
                    log.warning(
                        "%s answered %s %s: %s", client.engine.name, resp.status, path,
                        data[:300].decode("utf-8", "replace"),
                    )  # fmt: skip
            self._end(call, status)
            error = await client.error(status, data, body)
            if translation is not None:  # name the field the client sent
                error["error"]["param"] = translation.client_param(error["error"]["param"])
            if route.api == "anthropic":
                return JSONResponse(anthropic_body(status, error), status)
            return JSONResponse(error, status)
        data = call.adapt_body(client.whole_answer(path, data))
        answer = call.read_answer(data)
        guard = self.guards is not None and self.guards.reads_answers(route.text)
        if answer is not None and (
            call.reshape_answer is not None
            or guard
            or translation is not None
            or path in conform.ROUTES
        ):
            # Parsed once above; re-encoded once for all. OpenAI's published shape first
            # (whatever the engine), so rails and translations read one shape.
            answer = conform.answer(path, answer)
            if call.reshape_answer is not None:
                answer = call.reshape_answer(answer)
            if guard:
                answer = await self._guard_answer(route.text, payload, answer, call)
            if translation is not None:
                answer = translation.answer(answer)
                translation.finished(answer)
            data = json.dumps(answer).encode()
        self._end(call, resp.status)
        return Response(data, resp.status, media_type="application/json")

    async def _post(
        self, client: EngineClient, path: str, body: bytes, call: Call, stream: bool
    ) -> Answer:
        """The engine's response (its status and headers; a recallable stream's first bytes
        read too, into `call.head`), unless a change of turn recalls the request first
        (`Recalled`: the connection is closed, which makes the engine drop it)."""
        rid = call.engine_rid
        post: Coroutine[Any, Any, Answer]
        post = client.stream(path, body, rid) if stream else client.post(path, body, rid)
        try:
            if call.recall is None:
                resp = await post
            else:
                resp = await _unless_recalled(post, call.recall)
                if isinstance(resp, EngineStream) and resp.status == 200:
                    call.head = await _first_unless_recalled(resp, call.recall)
        except Recalled:
            raise
        except BaseException:
            self._given(client, call)
            raise
        self._given(client, call)
        return resp

    def _given(self, client: EngineClient, call: Call) -> None:
        """The request stays on `client`'s engine (it answered, or failed): counted there."""
        if call.slot is not None:
            call.slot.settled()
        if len(self.clients[client.served.id]) > 1:
            self.metrics.engine_requests.labels(client.served.id, client.engine.name).inc()

    async def _read(self, resp: Answer, call: Call, client: EngineClient) -> bytes:
        served = client.served
        chunks = resp.chunks() if isinstance(resp, EngineStream) else resp.content.iter_any()
        try:
            return await read_bounded(chunks, self.max_answer_bytes)
        except AnswerTooLargeError as exc:
            resp.close()  # the rest is never read: this connection is not reused
            raise EngineUnavailableError(f"engine for {served.id}: {exc}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            if call.abort_reason:
                raise DrainingError(call.abort_reason) from None
            client.supervisor.report_failure(f"the engine failed mid-answer: {exc}")
            raise EngineUnavailableError(
                f"engine for {served.id} failed mid-answer: {exc}"
            ) from None
        finally:
            if isinstance(resp, EngineStream):
                resp.close()
            else:
                resp.release()  # its connection back to the pool

    async def _guard_answer(
        self, text: str, request: dict[str, Any], answer: dict[str, Any], call: Call
    ) -> dict[str, Any]:
        assert self.guards is not None
        try:
            guarded = await self.guards.guard_answer(text, request, answer)
        except ContentFilterError:
            call.finish_reason = "content_filter"
            self._end(call, 400)
            raise
        choices = guarded.get("choices") or []
        if any(isinstance(c, dict) and c.get("finish_reason") == "content_filter" for c in choices):
            call.finish_reason = "content_filter"
        return guarded

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
