"""Rails at run time: checks on request text before the engine, and on answers after it.

`Guardrails` is built once from the config file and shared; what one request needs (the texts,
a streamed answer's held-back tail) lives in per-request objects (`StreamFilter`).

- Input rails read the user's messages (chat) or the prompt (completions). PII first: `redact`
  rewrites them before anything else sees them (an external guard model included), `block`
  refuses the request (400 `content_filter`). Then the model-backed rails (jailbreak, content
  safety, topic control) run concurrently, so they cost the slowest one, not their sum.
- Output rails read each choice's text. Not streamed: redact in place, or replace a blocked answer
  with the configured refusal (`finish_reason: "content_filter"`), or a 400 without one.
  Streamed: text is checked as it arrives; the last `HOLD` characters wait for the next event
  (a card number or an email can be cut across events) unless the stream ends; a redacted
  span never reaches the client. With the content-safety output rail, text is released a window
  at a time once the guard model has judged the answer so far. A blocked stream ends at once with
  a notice and `finish_reason: "content_filter"`, and the engine connection is closed.

Models are reached through `GuardModels`, which the server implements (engines served here, or an
OpenAI-compatible URL), so this package never imports the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inferd.errors import (
    ConfigError,
    ContentFilterError,
    EngineNotReadyError,
    EngineUnavailableError,
    GuardModelError,
    InferdError,
    InvalidRequestError,
)
from inferd.guardrails import jailbreak, judges, pii
from inferd.guardrails.config import (
    ContentSafetyRail,
    GuardModel,
    GuardrailsConfig,
    JailbreakRail,
    PiiRail,
    TopicControlRail,
)
from inferd.guardrails.jailbreak import Probe
from inferd.guardrails.judges import Judgement, UnusableVerdict
from inferd.guardrails.stream import StreamFilter
from inferd.guardrails.texts import (
    Texts,
    answer_texts,
    conversation,
    request_texts,
    user_text,
)
from inferd.guardrails.verdict import Verdict
from inferd.observability.metrics import Metrics

log = logging.getLogger("inferd.guardrails")

KNOWN_RAILS = ("pii", "jailbreak", "content_safety", "topic_control")
PII_WORKERS = 2
# The most text the PII rail reads for one request or check (characters): a budget, so one
# request cannot buy minutes of pattern matching (1 MiB of digits takes about 15 s).
MAX_PII_CHARS = 256 * 1024
# Where a route's text is, as routes declare it (server.routes): chat messages, a completion
# prompt, or none at all (said explicitly).
GENERATION = ("/v1/chat/completions", "/v1/completions")
NO_TEXT = ""


# Every request field, on either engine, that makes an answer carry generated text or tokens
# outside the choices' text (what the output rails read): each is refused while they are on.
ANSWER_CARRIERS: dict[str, str] = {
    "logprobs": "each generated token",  # OpenAI, both engines
    "top_logprobs": "each generated token and its alternatives",
    "tools": "tool-call arguments",
    "functions": "function-call arguments",
    "n_probs": "each generated token and its alternatives",  # llama.cpp
    "post_sampling_probs": "each generated token",  # llama.cpp
    "return_tokens": "the generated token ids",  # llama.cpp
    "return_token_ids": "the generated token ids",  # vLLM
    "return_tokens_as_token_ids": "the generated tokens",  # vLLM
    "logprob_token_ids": "chosen tokens' logprobs",  # vLLM
}


def _pii_budget(chars: int) -> None:
    if chars > MAX_PII_CHARS:
        raise InvalidRequestError(
            f"the text to check is {chars} characters; the pii rail reads at most "
            f"{MAX_PII_CHARS} per request"
        )


def _token_prompt(payload: dict[str, Any]) -> bool:
    """A completions prompt given as token ids (a list of ints, or of lists of ints)."""
    prompt = payload.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return False
    return all(isinstance(p, int) for p in prompt) or any(isinstance(p, list) for p in prompt)


def _declared(route: str) -> bool:
    """Whether the route's text is where rails read it; a route that declares something else
    must not reach an engine unguarded."""
    if route in GENERATION:
        return True
    if route == NO_TEXT:
        return False
    raise ValueError(f"the guardrails do not know where route {route!r} keeps its text")


class GuardModels(Protocol):
    """How rails reach models; the server implements it."""

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        """One vector per text (texts longer than the model reads are cut at the end)."""
        ...

    async def chat(
        self,
        guard: GuardModel,
        model: str,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
    ) -> str:
        """The guard model's answer text (greedy)."""
        ...


class Guardrails:
    def __init__(
        self,
        config: GuardrailsConfig,
        metrics: Metrics | None = None,
        models: GuardModels | None = None,
        served: dict[str, str] | None = None,
    ) -> None:
        """`served`: model id -> task of each model in this service, to resolve and check the
        models the rails name (a mistake stops start-up)."""
        self.metrics = metrics
        # How rails reach models: `models` for output rails (no admission: the request holds a
        # slot already), `admitted` for input rails and the check routes (they wait for one).
        self.models = models
        self.admitted = models
        self.served = served or {}
        self.config = config = self._resolved(config)
        self.inline_input, self.inline_output = config.inline()
        # The PII rail's pattern work runs here, never on the event loop: its cost grows with
        # digit-dense text (about 15 ms per KiB), and a few threads bound how much of the CPU
        # concurrent requests can take with it.
        self.pii_workers = ThreadPoolExecutor(PII_WORKERS, thread_name_prefix="inferd-pii")
        self.probe: Probe | None = None
        self.state = "ready"
        # Set once every rail can run (the jailbreak classifier loaded or trained), or failed.
        self.prepared = asyncio.Event()
        self.failed = asyncio.Event()
        if config.input.jailbreak is not None:
            self.state = "waiting for the jailbreak classifier"
        else:
            self.prepared.set()

    @property
    def active(self) -> bool:
        return self.config.active

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def jailbreak_model(self) -> str | None:
        rail = self.config.input.jailbreak
        return None if rail is None else rail.model

    def models_used(self) -> dict[str, dict[str, str]]:
        """Stage -> rail -> the model it asks."""
        out: dict[str, dict[str, str]] = {}
        for stage in ("input", "output"):
            for name, rail in dict(getattr(self.config, stage)).items():
                if rail is not None and getattr(rail, "model", None) is not None:
                    out.setdefault(stage, {})[name] = rail.model
        return out

    def _resolved(self, config: GuardrailsConfig) -> GuardrailsConfig:
        """The config with every model-backed rail's model named and checked against those
        served (each rail its own: an output rail may ask another model than the input one)."""
        stages = {}
        for stage in ("input", "output"):
            rails = getattr(config, stage)
            named = {}
            for name in ("jailbreak", "content_safety", "topic_control"):
                rail = getattr(rails, name, None)
                if rail is not None:
                    model = self._model_for(f"{stage}.{name}", name, rail)
                    named[name] = rail.model_copy(update={"model": model})
                    if (getattr(rail, "url", None) or "").startswith(
                        "http://"
                    ) and rail.api_key_env:
                        log.warning(
                            "%s.%s: the guard's API key goes to %s unencrypted; use https "
                            "unless the network is private",
                            stage,
                            name,
                            rail.url,
                        )
            stages[stage] = rails.model_copy(update=named)
        return config.model_copy(update=stages)

    def _model_for(self, where: str, name: str, rail: Any) -> str:
        tasks = ("embedding",) if name == "jailbreak" else ("guard", "chat")
        where = f"guardrails config: {where}"
        if rail.model is not None:
            if getattr(rail, "url", None) is not None:
                return str(rail.model)  # served elsewhere
            task = self.served.get(rail.model)
            if task is None:
                names = ", ".join(sorted(self.served)) or "none"
                raise ConfigError(
                    f"{where}: model {rail.model} is not served by this service (it serves: "
                    f"{names}); add it to the models served, or give the guard's url"
                )
            if task not in tasks:
                raise ConfigError(f"{where}: model {rail.model} is a {task} model, not {tasks[0]}")
            return str(rail.model)
        for task in tasks:  # a dedicated guard model before the chat model
            fitting = [m for m, t in self.served.items() if t == task]
            if len(fitting) == 1:
                return fitting[0]
            if len(fitting) > 1:
                raise ConfigError(
                    f"{where}: several {task} models are served ({', '.join(fitting)}); "
                    "name one in model:"
                )
        raise ConfigError(
            f"{where}: no {tasks[0]} model is served; serve one (e.g. "
            f"{'all-minilm-l6-v2' if name == 'jailbreak' else 'a guard model'}) and name it in "
            "model:"
        )

    def describe(self) -> dict[str, Any]:
        """For /v1/health/ready and /v1/metadata: which rails run and with what."""
        out: dict[str, Any] = {"state": self.state, "models": self.models_used()}
        if self.probe is not None:
            out["jailbreak_classifier"] = self.probe.describe()
        return out

    # ------------------------------------------------------------------ the jailbreak classifier

    async def prepare_jailbreak(self, data: dict[str, Path], probe_file: Path) -> None:
        """Load the classifier, or train it through the embedding engine (once per cache)."""
        assert self.models is not None
        model = self.jailbreak_model
        assert model is not None
        probe = Probe.load(probe_file)
        if probe is None or probe.model != model:
            if not data:
                raise InferdError(
                    f"the stored classifier {probe_file} is unreadable and its training data was "
                    "not fetched; remove the file and start again"
                )

            def progress(step: str) -> None:
                self.state = f"training the jailbreak classifier: {step}"
                log.info("%s", self.state)

            async def embed(texts: list[str]) -> np.ndarray:
                assert self.models is not None
                return await self.models.embed(model, texts)

            probe = await jailbreak.train(model, data, embed, progress)
            probe.save(probe_file)
            log.info(
                "jailbreak classifier trained in %.0f s; held-out test: %s",
                probe.trained_s,
                probe.test,
            )
        self.probe = probe
        self.state = "ready"
        self.prepared.set()

    async def jailbreak(
        self, texts: list[str], rail: JailbreakRail, stage: str, via: GuardModels | None = None
    ) -> Verdict:
        models = via or self.admitted
        if self.probe is None or models is None or rail.model is None:
            raise EngineNotReadyError(
                f"the jailbreak rail is not ready yet ({self.state}); retry shortly"
            )
        started = time.perf_counter()
        flat, _ = jailbreak.windows_of([t for t in texts if t.strip()])
        score = 0.0
        if flat:
            try:
                vectors = await asyncio.wait_for(models.embed(rail.model, flat), rail.timeout_s)
            except TimeoutError:
                raise EngineUnavailableError(
                    f"the jailbreak rail's embedding model did not answer within "
                    f"{rail.timeout_s:g} s"
                ) from None
            score = float(self.probe.scores(vectors).max())
        seconds = time.perf_counter() - started
        blocked = score >= rail.threshold
        self.record("jailbreak", stage, seconds, blocked, 0)
        categories = ["jailbreak"] if blocked else []
        return Verdict("jailbreak", blocked, "block", categories, round(score, 4), seconds * 1000)

    # ------------------------------------------------------------------ guard-model rails

    async def _judge(
        self,
        name: str,
        rail: GuardModel,
        stage: str,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        parse: Any,
        max_tokens: int,
        via: GuardModels | None,
    ) -> Verdict:
        models = via or (self.models if stage == "output" else self.admitted)
        assert models is not None and rail.model is not None
        started = time.perf_counter()
        structured = rail.structured if rail.structured is not None else rail.url is None
        error = None
        try:
            answer = await asyncio.wait_for(
                models.chat(
                    rail,
                    rail.model,
                    messages,
                    schema=schema if structured else None,
                    max_tokens=max_tokens,
                ),
                rail.timeout_s,
            )
            judgement: Judgement = parse(answer)
        except (UnusableVerdict, GuardModelError, EngineUnavailableError) as exc:
            # Busy or not-ready engines are not verdicts: those errors reach the caller (503).
            error = str(exc)
        except TimeoutError:
            error = f"the guard model did not answer within {rail.timeout_s:g} s"
        seconds = time.perf_counter() - started
        if error is not None:
            log.warning("%s rail: no usable verdict (%s); on_error=%s", name, error, rail.on_error)
            blocked = rail.on_error == "block"
            self.record(name, stage, seconds, blocked, 0)
            score = 1.0 if blocked else 0.0
            return Verdict(name, blocked, "block", [], score, seconds * 1000, error=error)
        self.record(name, stage, seconds, judgement.unsafe, 0)
        score = 1.0 if judgement.unsafe else 0.0
        return Verdict(name, judgement.unsafe, "block", judgement.categories, score, seconds * 1000)

    async def content_safety(
        self,
        user: str,
        response: str | None,
        rail: ContentSafetyRail,
        stage: str,
        via: GuardModels | None = None,
    ) -> Verdict:
        with_response = response is not None
        return await self._judge(
            "content_safety",
            rail,
            stage,
            judges.safety_messages(user, response),
            judges.safety_schema(with_response),
            lambda answer: judges.parse_safety(answer, response=with_response),
            200,
            via,
        )

    async def topic_control(
        self,
        conversation: list[dict[str, str]],
        rail: TopicControlRail,
        stage: str,
        via: GuardModels | None = None,
    ) -> Verdict:
        return await self._judge(
            "topic_control",
            rail,
            stage,
            judges.topic_messages(rail.topics, conversation),
            judges.TOPIC_SCHEMA,
            judges.parse_topic,
            12,
            via,
        )

    # ------------------------------------------------------------------ PII

    async def pii_off_loop(self, text: str, rail: PiiRail, stage: str) -> Verdict:
        """The PII rail over `text`, in its worker threads."""
        _pii_budget(len(text))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pii_workers, self.pii, text, rail, stage)

    def pii(self, text: str, rail: PiiRail, stage: str) -> Verdict:
        started = time.perf_counter()
        found = pii.find(text, rail.kinds, rail.region)
        seconds = time.perf_counter() - started
        kinds = sorted({f.kind for f in found})
        blocked = bool(found) and rail.action == "block"
        verdict = Verdict(
            "pii",
            blocked,
            rail.action,
            kinds,
            1.0 if found else 0.0,
            seconds * 1000,
            pii.redact(text, found) if found and rail.action == "redact" else None,
        )
        self.record("pii", stage, seconds, blocked, 0 if blocked else len(found))
        return verdict

    def record(self, rail: str, stage: str, seconds: float, blocked: bool, redacted: int) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.guardrail_checks.labels(rail, stage).inc()
        m.guardrail_seconds.labels(rail, stage).observe(seconds)
        if blocked:
            m.guardrail_blocks.labels(rail, stage).inc()
        if redacted:
            m.guardrail_redactions.labels(rail, stage).inc(redacted)

    # ------------------------------------------------------------------ /v1/guardrails/check

    def _rail_or_default(self, name: str, param: str | None = "rails") -> Any:
        rail = self.config.rail(name)
        if rail is None and name == "pii":
            return PiiRail(action="block")
        if rail is None:
            raise InvalidRequestError(
                f"rail {name} is not configured in this service's guardrails file (configured: "
                f"{', '.join(self.configured()) or 'none'})",
                param=param,
            )
        return rail

    def configured(self) -> list[str]:
        return [n for n in KNOWN_RAILS if self.config.rail(n) is not None]

    async def check(
        self, texts: Texts, rails: list[str], via: GuardModels | None = None
    ) -> list[Verdict]:
        """`/v1/guardrails/check`: each named rail over the texts, one verdict per rail; the
        rails run concurrently. `via`: how to reach the models, if not as inline rails do."""
        unknown = [r for r in rails if r not in KNOWN_RAILS]
        if unknown or not rails or len(set(rails)) != len(rails):
            raise InvalidRequestError(
                f"rails must name some of {', '.join(KNOWN_RAILS)}, each once; got {rails!r}",
                param="rails",
            )
        settings = {name: self._rail_or_default(name) for name in rails}
        jobs = []
        for name, rail in settings.items():
            if name == "pii":
                jobs.append(self.pii_off_loop("\n".join(texts.all), rail, "check"))
            elif name == "jailbreak":
                jobs.append(self.jailbreak(texts.all, rail, "check", via))
            elif name == "content_safety":
                user = "\n\n".join(texts.user)
                jobs.append(self.content_safety(user, texts.response, rail, "check", via))
            else:
                jobs.append(self.topic_control(texts.conversation, rail, "check", via))
        return list(await asyncio.gather(*jobs))

    async def classify(self, text: str, via: GuardModels | None = None) -> Verdict:
        """NemoGuard JailbreakDetect's `/v1/classify`."""
        rail = self._rail_or_default("jailbreak", param=None)
        return await self.jailbreak([text], rail, "check", via)

    # ------------------------------------------------------------------ requests

    async def guard_request(self, route: str, payload: dict[str, Any], offload: bool) -> bool:
        """Input rails over a generation request; True when its text was rewritten.
        `offload`: run the PII rail in a worker thread (long bodies)."""
        if not _declared(route):
            return False
        if self.reads_answers(route):
            # Text the output rails do not read would carry what they redact or block.
            for name, carries in ANSWER_CARRIERS.items():
                value = payload.get(name)
                if value is not None and value is not False:  # `logprobs: 0` asks for some too
                    raise InvalidRequestError(
                        f"{name} is not available while output rails are on: it would return "
                        f"{carries}, which the rails do not check",
                        param=name,
                    )
        inputs = self.inline_input
        has_input_rails = any(
            r is not None
            for r in (inputs.pii, inputs.jailbreak, inputs.content_safety, inputs.topic_control)
        )
        if has_input_rails and route == GENERATION[1] and _token_prompt(payload):
            # Token ids are text the input rails cannot read without the model's tokenizer.
            raise InvalidRequestError(
                "a prompt given as token ids is not accepted while input rails are on: "
                "send it as text",
                param="prompt",
            )
        rails = self.inline_input
        param = "messages" if route.endswith("chat/completions") else "prompt"
        changed = False
        if rails.pii is not None:
            held = request_texts(route, payload, rails.pii.roles)
            _pii_budget(sum(len(h[k]) for h, k in held))
            if offload:
                loop = asyncio.get_running_loop()
                changed = await loop.run_in_executor(
                    self.pii_workers, self._pii_request, route, payload, rails.pii
                )
            else:
                changed = self._pii_request(route, payload, rails.pii)
        jobs = []
        if rails.jailbreak is not None:
            texts = [h[k] for h, k in request_texts(route, payload, rails.jailbreak.roles)]
            jobs.append(self.jailbreak(texts, rails.jailbreak, "input"))
        if rails.content_safety is not None:
            texts = [h[k] for h, k in request_texts(route, payload, rails.content_safety.roles)]
            jobs.append(
                self.content_safety("\n\n".join(texts), None, rails.content_safety, "input")
            )
        if rails.topic_control is not None:
            turns = conversation(route, payload, rails.topic_control.roles)
            jobs.append(self.topic_control(turns, rails.topic_control, "input"))
        for verdict in await asyncio.gather(*jobs):
            if verdict.blocked:
                raise ContentFilterError(_blocked_message(verdict, "request"), param=param)
        return changed

    def _pii_request(self, route: str, payload: dict[str, Any], rail: PiiRail) -> bool:
        changed = False
        for holder, key in request_texts(route, payload, rail.roles):
            verdict = self.pii(holder[key], rail, "input")
            if verdict.blocked:
                raise ContentFilterError(
                    _blocked_message(verdict, "request"),
                    param="messages" if route.endswith("chat/completions") else "prompt",
                )
            if verdict.redacted is not None:
                holder[key] = verdict.redacted
                changed = True
        return changed

    def reads_answers(self, route: str) -> bool:
        """Whether output rails read this route's answers (else they pass untouched)."""
        out = self.inline_output
        return (out.pii is not None or out.content_safety is not None) and route in GENERATION

    async def guard_answer(
        self, route: str, request: dict[str, Any], answer: dict[str, Any]
    ) -> dict[str, Any]:
        """Output rails over a whole (not streamed) answer; `request` as the engine got it."""
        if not self.reads_answers(route):
            return answer
        rails = self.inline_output
        for choice in answer.get("choices") or []:
            for holder, key in answer_texts(route, choice):
                blocked = None
                if rails.pii is not None:  # first: the guard model never sees what it redacts
                    verdict = self.pii(holder[key], rails.pii, "output")
                    if verdict.blocked:
                        blocked = verdict
                    elif verdict.redacted is not None:
                        holder[key] = verdict.redacted
                if blocked is None and rails.content_safety is not None:
                    user = user_text(route, request, rails.content_safety.roles)
                    verdict = await self.content_safety(
                        user, holder[key], rails.content_safety, "output"
                    )
                    blocked = verdict if verdict.blocked else None
                if blocked is not None:
                    if self.config.refusal is None:
                        raise ContentFilterError(_blocked_message(blocked, "answer"))
                    _refuse(route, choice, self.config.refusal)
                    break
        return answer

    def stream_filter(self, route: str, request: dict[str, Any]) -> StreamFilter | None:
        if not self.reads_answers(route):
            return None
        rails = self.inline_output
        user = (
            user_text(route, request, rails.content_safety.roles)
            if rails.content_safety is not None
            else ""
        )
        return StreamFilter(self, chat=route.endswith("chat/completions"), user=user)


def _blocked_message(verdict: Verdict, what: str) -> str:
    if verdict.error is not None:  # the details (addresses, raw answers) stay in the log
        return (
            f"blocked by the {verdict.rail} rail: its guard model gave no usable verdict and the "
            "rail fails closed (on_error: block)"
        )
    if verdict.rail == "pii":
        stage = "input" if what == "request" else "output"
        return (
            f"blocked by the pii {stage} rail: the {what} contains {', '.join(verdict.categories)}"
        )
    if verdict.rail == "jailbreak":
        return (
            f"blocked by the jailbreak rail: the {what} reads as a jailbreak or prompt injection "
            f"(score {verdict.score:.2f})"
        )
    if verdict.rail == "topic_control":
        return f"blocked by the topic_control rail: the {what} is off-topic for this service"
    cats = f" ({', '.join(verdict.categories)})" if verdict.categories else ""
    return f"blocked by the content_safety rail: the guard model judged the {what} unsafe{cats}"


def _refuse(route: str, choice: dict[str, Any], refusal: str) -> None:
    """A blocked answer: the refusal alone, nothing of what the model said."""
    choice["finish_reason"] = "content_filter"
    choice.pop("logprobs", None)
    if route.endswith("chat/completions"):
        choice["message"] = {"role": "assistant", "content": refusal}
    else:
        choice["text"] = refusal
