"""How the rails reach models (`guardrails.rails.GuardModels`): engines of this service, or a
guard model behind any OpenAI-compatible URL (a NemoGuard NIM, another inferd).

Input rails and the check routes (`/v1/guardrails/check`, `/v1/classify`) wait for a slot like
any request (`admit=True`): a burst of guarded requests cannot overrun an engine. Output rails
do not: their request already holds a slot, maybe of the very engine it asks (a chat model
judging its own answers), and waiting for a slot while holding one deadlocks under load; each
admitted request makes a bounded number of them, and the engines queue them. None is counted as a
client request in the request metrics; the rails' own metrics count them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import aiohttp
import numpy as np

from inferd.errors import EngineUnavailableError, GuardModelError
from inferd.guardrails.config import GuardModel
from inferd.server import retrieval
from inferd.server.proxy import Proxy
from inferd.server.served import ModelTable, ServedModel

log = logging.getLogger("inferd.guardrails")
EMBED_BATCH = 64  # texts per embedding request: large enough to batch, small enough to share


class ServiceGuardModels:
    def __init__(self, proxy: Proxy, table: ModelTable, *, admit: bool) -> None:
        self.proxy = proxy
        self.table = table
        self.admit = admit

    async def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        """A guard model behind a URL: the answer's JSON. Errors say what went wrong but not
        where: they can reach clients (in /v1/guardrails/check verdicts); the address and the
        body go to the log."""
        session = self.proxy.session
        assert session is not None
        try:
            # No redirects: the body and the key go to the configured address only.
            async with session.post(
                url, json=payload, headers=headers, allow_redirects=False
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    log.warning("guard call to %s: %s %s", url, resp.status, data[:300])
                    raise GuardModelError(f"the guard model's server answered {resp.status}")
                return json.loads(data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("guard call to %s failed: %s", url, exc)
            raise GuardModelError("the guard model's server could not be reached") from None
        except ValueError:
            raise GuardModelError("the guard model's server answered something not JSON") from None

    async def _engine(self, served: ServedModel, path: str, payload: dict[str, Any]) -> Any:
        """A model served here, through its engine client (the proxy's translation)."""
        served.require_ready()
        slot = await served.admission.acquire() if self.admit else None
        try:
            lane = slot.lane if slot is not None else 0
            return await self.proxy.client(served.id, lane).json(path, payload)
        finally:
            if slot is not None:
                slot.release()

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        served = self.table.lookup(model)
        batches = [texts[i : i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
        vectors: list[list[float]] = []
        for batch in batches:
            payload = retrieval.embeddings_request(
                {"model": model, "input": batch, "truncate": "END"}, served.entry
            )
            answer = await self._engine(served, "/v1/embeddings", payload)
            try:
                data = sorted(answer["data"], key=lambda d: d["index"])
                vectors += [d["embedding"] for d in data]
            except (KeyError, TypeError) as exc:
                raise EngineUnavailableError(f"{model} answered embeddings without {exc}") from None
        return np.asarray(vectors, dtype=np.float64)

    async def chat(
        self,
        guard: GuardModel,
        model: str,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
    ) -> str:
        payload: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        }
        if schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": schema, "strict": True},
            }
        if guard.url is None:
            answer = await self._engine(self.table.lookup(model), "/v1/chat/completions", payload)
        else:
            headers = {}
            if guard.api_key_env:
                key = os.environ.get(guard.api_key_env)
                if not key:
                    raise GuardModelError(f"{guard.api_key_env} is not set (the guard's API key)")
                headers["Authorization"] = f"Bearer {key}"
            url = guard.url.rstrip("/") + "/chat/completions"
            answer = await asyncio.wait_for(self._post(url, payload, headers), guard.timeout_s)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GuardModelError("the guard model's answer has no message content") from None
        if not isinstance(content, str):
            raise GuardModelError("the guard model's answer has no text")
        return content
