"""How the front talks to one served model's engine: the one place engine requests are built,
sent and read back.

`EngineSessions` holds what the front's HTTP clients share: the read timeout of every engine
request, and the pool for guard models behind a URL (opened and closed by the app's lifespan).
An `EngineClient` per served model reaches its engine through the supervisor's `EngineLink` (the
pools to the current start's Unix socket: `server.engine_link`), puts a request body into the
engine's own shape (renamed fields, reshaped routes), posts it with the one
retry a dropped kept-alive connection deserves, reads a whole answer back into inferd's shape,
turns the engine's errors into the OpenAI envelope (with the prompt's real token count when it
did not fit), and counts tokens with the engine's tokenizer. Both the proxy (client requests)
and the guard models (rail calls) go through it, so the translation code lives once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp

from inferd.engines.base import Engine
from inferd.errors import EngineUnavailableError, InvalidRequestError
from inferd.server.engine_link import EngineLink
from inferd.server.engine_stream import EngineStream, request_bytes
from inferd.server.errors import from_engine
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor

log = logging.getLogger("inferd.requests")

# How long the engine has to say what it is working on (`EngineClient.working`): it answers
# between decodes, so a long batch may hold it back; a late answer is no answer.
WORKING_LIMIT_S = 1.0


def _too_long(tokens: int, context: int, engine_said: str) -> str:
    return (
        f"the prompt has {tokens} tokens and the model's context is {context}; shorten the "
        f"prompt (nothing was truncated). Engine: {engine_said}"
    )


class EngineSessions:
    """What the front's HTTP clients share. `read_timeout_s`: how long an engine may stay
    silent mid-answer (a hung engine must not hold a request for ever). `pool`: for guard
    models behind a URL; engines are reached through their own `EngineLink`."""

    def __init__(self, read_timeout_s: float | None = None) -> None:
        self.read_timeout_s = read_timeout_s
        # No total timeout: a long generation is not an error.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout_s)
        self.pool: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.pool = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=self.timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.pool is not None, "the front's sessions are opened by the app's lifespan"
        return self.pool


class EngineClient:
    """One engine of a served model, as the front speaks to it (`supervisor`: which of its
    engines, for a model with several; its first by default)."""

    def __init__(
        self, served: ServedModel, sessions: EngineSessions, supervisor: Supervisor | None = None
    ) -> None:
        self.served = served
        self.sessions = sessions
        self.supervisor = supervisor or served.supervisor
        self._asking: asyncio.Future[int | None] | None = None  # `working`'s ask in flight

    @property
    def engine(self) -> Engine:
        return self.supervisor.engine

    def link(self) -> EngineLink:
        """The pools to the engine's current start; EngineUnavailableError between starts."""
        link = self.supervisor.link
        if link is None:
            raise EngineUnavailableError(f"the engine of {self.served.id} is not running")
        return link

    # ------------------------------------------------------------------ requests

    def encode(self, path: str, payload: dict[str, Any], raw: bytes | None = None) -> bytes:
        """The request body in the engine's shape. `raw`: the client's own bytes, sent as they
        are when nothing had to change (the body is re-encoded once, and only if needed)."""
        engine = self.engine
        renamed = [ours for ours in engine.param_aliases if ours in payload]
        for ours in renamed:
            payload[engine.param_aliases[ours]] = payload.pop(ours)
        if path in engine.adapted_routes:
            return json.dumps(engine.adapt(path, payload)).encode()
        if raw is not None and not renamed:
            return raw
        return json.dumps(payload).encode()

    def _headers(self, rid: str) -> dict[str, str]:
        """What every request to the engine carries: JSON, the request's id, the start's key."""
        return {
            "Content-Type": "application/json",
            "X-Request-Id": rid,
            **self.supervisor.auth_headers(),
        }

    async def post(self, path: str, body: bytes, rid: str) -> aiohttp.ClientResponse:
        """Post `body` for a whole answer (streams: `stream`); the engine's response, its body
        unread. A pooled connection that fails before an answer is tried once more on a fresh
        connection; then the engine is reported."""
        url = EngineLink.url(path)
        headers = self._headers(rid)
        timeout = self.sessions.timeout
        try:
            try:
                # Nothing is awaited between taking the link and posting on it: the supervisor
                # closes a link once its engine start has ended, and posting on a closed one
                # would raise RuntimeError, not a ClientError.
                link = self.link()
                return await link.pool.post(url, data=body, headers=headers, timeout=timeout)
            except aiohttp.ClientConnectionError as first:
                # A kept-alive connection the engine closed just as it was reused: nothing was
                # answered, so send once more, on a fresh connection. Before streams to
                # llama-server went out on fresh connections, 5-25% of requests at 12-16
                # streams took this way (benchmarks/RESULTS.md).
                log.info("engine connection failed before an answer (%s); retrying once", first)
                fresh = self.link().fresh
                return await fresh.post(url, data=body, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.supervisor.report_failure(f"a request could not reach the engine: {exc}")
            raise EngineUnavailableError(
                f"engine for {self.served.id} is unreachable: {exc}"
            ) from None

    async def stream(self, path: str, body: bytes, rid: str) -> EngineStream:
        """Post `body` for a streamed answer, on a connection of its own
        (`server.engine_stream`); the answer's status and headers read, its body not.
        EngineUnavailableError (the engine reported) when it cannot be reached."""
        headers = self._headers(rid)
        request = request_bytes(path, headers, body)
        try:
            socket = self.link().socket
            return await EngineStream.open(socket, request, self.sessions.read_timeout_s)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.supervisor.report_failure(f"a request could not reach the engine: {exc}")
            raise EngineUnavailableError(
                f"engine for {self.served.id} is unreachable: {exc}"
            ) from None

    def whole_answer(self, path: str, data: bytes) -> bytes:
        """A whole answer of a route whose shape differs on this engine (tokenize), in
        inferd's shape; other answers as they are (their per-event reshaping is the `Call`'s)."""
        engine = self.engine
        if path in engine.adapted_routes:
            with contextlib.suppress(ValueError):
                return json.dumps(engine.adapt_answer(path, json.loads(data))).encode()
        return data

    async def json(self, path: str, payload: dict[str, Any]) -> Any:
        """A whole request for the front's own use (guard rails): the answer's JSON.
        EngineUnavailableError when the engine fails or answers an error."""
        body = self.encode(path, payload)
        who = f"guard call to {self.served.id}"
        try:
            resp = await self.post(path, body, "guard")
            async with resp:
                data = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raise EngineUnavailableError(
                f"{who}: the guard model's server could not be reached"
            ) from None
        if resp.status != 200:
            log.warning("%s at %s: %s %s", who, path, resp.status, data[:300])
            raise EngineUnavailableError(f"{who}: the guard model's server answered {resp.status}")
        try:
            return json.loads(self.whole_answer(path, data))
        except ValueError:
            raise EngineUnavailableError(
                f"{who}: the guard model's server answered something not JSON"
            ) from None

    async def working(self) -> int | None:
        """How many requests the engine is working on now, by its own account (None: it does
        not say, or did not answer). Callers at the same moment share one ask."""
        if self.engine.working_path is None:
            return None
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_working(self.engine.working_path))
        # Shielded: one caller that goes away does not cancel the others' answer.
        return await asyncio.shield(self._asking)

    async def _ask_working(self, path: str) -> int | None:
        got = await self.supervisor.fetch(path, limit_s=WORKING_LIMIT_S)
        if got is None or got[0] != 200:
            return None
        try:
            return self.engine.working(json.loads(got[1]))
        except ValueError:
            return None

    # ------------------------------------------------------------------ errors

    async def error(self, status: int, data: bytes, body: bytes) -> dict[str, Any]:
        """The engine's error answer in the OpenAI envelope; a prompt that did not fit gets its
        real token count (engines stop counting at the limit, "at least 8193", and a user
        deciding how much to cut needs the real number)."""
        error = from_engine(status, data)
        counts = self.engine.prompt_too_long(data)
        if counts is not None:  # the engine counted the whole prompt itself
            tokens, context = counts
            error["error"]["message"] = _too_long(tokens, context, error["error"]["message"])
        elif status == 400 and b"maximum context length" in data:
            await self._count_prompt(body, error)
        return error

    async def _count_prompt(self, body: bytes, error: dict[str, Any]) -> None:
        payload = json.loads(body)
        query: dict[str, Any] = {"model": payload["model"]}
        texts = payload.get("input")
        if isinstance(payload.get("prompt"), str):
            query["prompt"] = payload["prompt"]
        elif isinstance(payload.get("messages"), list):
            query.update(messages=payload["messages"], add_generation_prompt=True)
            if payload.get("tools"):
                query["tools"] = payload["tools"]
        elif isinstance(texts, str | list) and texts:
            await self._count_inputs(query, texts, error)
            return
        else:
            return
        counted = await self.token_count(query)
        if counted is not None:
            error["error"]["message"] = _too_long(*counted, error["error"]["message"])

    async def token_count(self, query: dict[str, Any]) -> tuple[int, int] | None:
        """(tokens, the model's context) from the engine's tokenizer; None if it cannot say."""
        with (
            self.supervisor.awake(),  # the request's slot may be gone: a resting engine wakes
            contextlib.suppress(
                aiohttp.ClientError, TimeoutError, ValueError, KeyError, EngineUnavailableError
            ),
        ):
            async with self.link().pool.post(
                EngineLink.url("/tokenize"),
                data=self.encode("/tokenize", dict(query)),
                headers={
                    "Content-Type": "application/json",
                    **self.supervisor.auth_headers(),
                },
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                counted = json.loads(self.whole_answer("/tokenize", await resp.read()))
                return int(counted["count"]), int(counted["max_model_len"])
        return None

    async def count_chat(self, query: dict[str, Any]) -> int:
        """The prompt tokens of a chat request (`messages`, `tools`, ...) as the engine renders
        it with the model's chat template and counts it with its own tokenizer: vLLM's
        /tokenize takes messages; llama-server's takes text only, and counts a chat request on
        a route of its own."""
        path = self.engine.chat_tokens_path
        answer = await self._post_json(path, query)
        try:
            return int(answer["input_tokens"] if "input_tokens" in answer else answer["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineUnavailableError(
                f"the engine of {self.served.id} did not count the tokens: {exc}"
            ) from None

    async def _post_json(self, path: str, payload: dict[str, Any]) -> Any:
        """A small request of the front's own; the engine's 4xx become the client's error."""
        with self.supervisor.awake():  # outside any request's slot: a resting engine wakes
            resp = await self.post(path, self.encode(path, dict(payload)), "count")
            async with resp:
                data = await resp.read()
        if resp.status >= 400:
            err = from_engine(resp.status, data)["error"]
            if resp.status >= 500:
                raise EngineUnavailableError(f"the engine of {self.served.id}: {err['message']}")
            raise InvalidRequestError(err["message"], param=err["param"])
        return json.loads(self.whole_answer(path, data))

    async def _count_inputs(
        self, query: dict[str, Any], texts: str | list[Any], error: Any
    ) -> None:
        """The same for embeddings: the longest text input, by index, with NIM's way out."""
        inputs = [texts] if isinstance(texts, str) else texts
        longest: tuple[int, int, int] | None = None  # tokens, index, context
        for index, text in enumerate(inputs[:256]):
            if not isinstance(text, str):
                return
            counted = await self.token_count({**query, "prompt": text})
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
