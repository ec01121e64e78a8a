"""The guardrails file (`INFERD_GUARDRAILS_CONFIG`): which rails run on chat traffic, and how.

```yaml
input:                 # before the engine sees the request (user messages, prompts)
  pii:
    action: redact     # redact | block
    kinds: [email, phone, payment_card, iban, ip_address, us_ssn]   # default: all
    roles: [user]      # whose messages (default: the user's)
  jailbreak:           # a classifier on an embedding model served here (trained once, cached)
    model: all-minilm-l6-v2
    threshold: 0.5
  content_safety:      # a guard model answers the S1..S22 verdict (every rail: `inline: false`
                       # serves /v1/guardrails/check only, not chat traffic)
    model: llama-3.1-nemoguard-8b-content-safety   # served here, or at `url`
    url: http://guard:8000/v1                      # optional: an OpenAI-compatible server
    api_key_env: GUARD_API_KEY                      # optional: its key, from this variable
  topic_control:
    model: smollm2-135m-instruct
    topics: |
      You are a cooking assistant. Only answer questions about recipes and cooking.
output:                # on the answer, streamed or not
  pii:
    action: redact
  content_safety:
    model: llama-3.1-nemoguard-8b-content-safety
refusal: "I can't share that."   # what a blocked non-streamed answer says; null: a 400 instead
```

A mistake stops start-up with the file, the line and the reason: a rail that silently does not
run is worse than none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.errors import ConfigError
from inferd.guardrails.pii import KINDS

PiiKind = Literal["email", "phone", "payment_card", "iban", "ip_address", "us_ssn"]
assert set(PiiKind.__args__) == set(KINDS)  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Rail(_Strict):
    # False: the rail serves /v1/guardrails/check (and /v1/classify) but does not run on chat
    # traffic (an application that calls the checks itself, like NeMo Guardrails).
    inline: bool = True


class PiiRail(_Rail):
    action: Literal["redact", "block"] = "redact"
    kinds: tuple[PiiKind, ...] = Field(default=KINDS, min_length=1)  # type: ignore[arg-type]
    # Input rails: whose messages are read. The user's by default: the system prompt is the
    # operator's own text, earlier assistant turns were checked on the way out.
    roles: tuple[Role, ...] = Field(default=("user",), min_length=1)
    # Where phone numbers without a country code are assumed to be (ISO 3166 code).
    region: str = Field(default="US", pattern=r"^[A-Z]{2}$")


class JailbreakRail(_Rail):
    # The embedding model (served in this service) the classifier reads vectors from; None:
    # the service's only embedding model.
    model: str | None = None
    # Score (probability of an attack) from which a prompt is blocked.
    threshold: float = Field(default=0.5, gt=0, lt=1)
    roles: tuple[Role, ...] = Field(default=("user",), min_length=1)
    # How long the embedding may take; a request past it fails (502) rather than wait.
    timeout_s: float = Field(default=10, gt=0)


class GuardModel(_Rail):
    """A chat model that judges text: one served here (`model`), or any OpenAI-compatible server
    (`url`, e.g. a NemoGuard NIM)."""

    # The model's id (here, or at `url`); None: the service's only chat model.
    model: str | None = None
    url: str | None = Field(default=None, pattern=r"^https?://")
    api_key_env: str | None = None  # name of the environment variable holding the URL's key
    # Constrain the answer to the verdict's shape with the engine's JSON-schema decoding; None:
    # on for models served here (small models otherwise wander off the format), off for `url`.
    structured: bool | None = None
    timeout_s: float = Field(default=30, gt=0)
    # What an unusable verdict (no answer, not the format) means: safety rails fail closed.
    on_error: Literal["block", "allow"] = "block"
    roles: tuple[Role, ...] = Field(default=("user",), min_length=1)

    @model_validator(mode="after")
    def _url_needs_model(self) -> GuardModel:
        if self.url is not None and self.model is None:
            raise ValueError("a guard model at `url` needs its `model` name")
        return self


class ContentSafetyRail(GuardModel):
    # Streamed answers (output rail): characters released per judgement. Each window waits
    # for the guard model's verdict on the answer so far before the client sees it.
    stream_window: int = Field(default=800, ge=1)


class TopicControlRail(GuardModel):
    # The operator's instructions: which topics are allowed (NemoGuard's system prompt).
    topics: str = Field(min_length=1)


class InputRails(_Strict):
    pii: PiiRail | None = None
    jailbreak: JailbreakRail | None = None
    content_safety: ContentSafetyRail | None = None
    topic_control: TopicControlRail | None = None


class OutputRails(_Strict):
    pii: PiiRail | None = None
    content_safety: ContentSafetyRail | None = None


class GuardrailsConfig(_Strict):
    input: InputRails = InputRails()
    output: OutputRails = OutputRails()
    refusal: str | None = "I can't help with that request."

    @property
    def active(self) -> bool:
        """Whether any rail runs on chat traffic."""
        inline_in, inline_out = self.inline()
        return any(v is not None for r in (inline_in, inline_out) for v in dict(r).values())

    @property
    def configured(self) -> bool:
        return any(v is not None for r in (self.input, self.output) for v in dict(r).values())

    def inline(self) -> tuple[InputRails, OutputRails]:
        """The rails that run on chat traffic (without those marked `inline: false`)."""

        def keep(rails: Any) -> Any:
            off = {k: None for k, v in dict(rails).items() if v is not None and not v.inline}
            return rails.model_copy(update=off)

        return keep(self.input), keep(self.output)

    def rail(self, name: str) -> Any:
        """The named rail's settings, from the input rails or else the output rails."""
        return getattr(self.input, name, None) or getattr(self.output, name, None)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...], at_key: bool = False) -> int | None:
    """The line (1-based) of the YAML node a validation error's location points at (`at_key`:
    of the last key itself, for a key that is not allowed)."""
    node, line = root, None
    for i, key in enumerate(loc):
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            pair = next((p for p in node.value if getattr(p[0], "value", None) == key), None)
            if pair is None:
                return line  # the key is missing: point at the mapping that lacks it
            if at_key and i == len(loc) - 1:
                return int(pair[0].start_mark.line) + 1
            node = pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node.start_mark.line + 1 if node is not None else line


def load(path: Path) -> GuardrailsConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"guardrails config {path}: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"guardrails config {path}{where}: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"guardrails config {path}:1: expected a mapping of rails")
    try:
        return GuardrailsConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        line = _line_of(root, tuple(first["loc"]), at_key=first["type"] == "extra_forbidden")
        field = ".".join(str(p) for p in first["loc"])
        where = f":{line}" if line else ""
        raise ConfigError(f"guardrails config {path}{where}: {field}: {first['msg']}") from None
