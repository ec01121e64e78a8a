"""The guardrails file (`INFERD_GUARDRAILS_CONFIG`): which rails run on chat traffic, and how.

```yaml
input:                 # before the engine sees the request (user messages, prompts)
  pii:
    action: redact     # redact | block
    kinds: [email, phone, payment_card, iban, ip_address, us_ssn]   # default: all
    roles: [user]      # whose messages (default: the user's)
output:                # on the answer, streamed or not
  pii:
    action: redact
refusal: "I can't share that."   # what a blocked non-streamed answer says; null: a 400 instead
```

A mistake stops start-up with the file, the line and the reason: a rail that silently does not
run is worse than none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferd.errors import ConfigError
from inferd.guardrails.pii import KINDS

PiiKind = Literal["email", "phone", "payment_card", "iban", "ip_address", "us_ssn"]
assert set(PiiKind.__args__) == set(KINDS)  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Role = Literal["system", "developer", "user", "assistant", "tool"]


class PiiRail(_Strict):
    action: Literal["redact", "block"] = "redact"
    kinds: tuple[PiiKind, ...] = Field(default=KINDS, min_length=1)  # type: ignore[arg-type]
    # Input rails: whose messages are read. The user's by default: the system prompt is the
    # operator's own text, earlier assistant turns were checked on the way out.
    roles: tuple[Role, ...] = Field(default=("user",), min_length=1)
    # Where phone numbers without a country code are assumed to be (ISO 3166 code).
    region: str = Field(default="US", pattern=r"^[A-Z]{2}$")


class Rails(_Strict):
    pii: PiiRail | None = None


class GuardrailsConfig(_Strict):
    input: Rails = Rails()
    output: Rails = Rails()
    refusal: str | None = "I can't help with that request."

    @property
    def active(self) -> bool:
        return any(r.pii is not None for r in (self.input, self.output))


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line (1-based) of the YAML node a validation error's location points at."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if node is None:
                # The key is missing or unknown: point at the key itself when it exists.
                return line
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
        line = _line_of(root, tuple(first["loc"]))
        field = ".".join(str(p) for p in first["loc"])
        where = f":{line}" if line else ""
        raise ConfigError(f"guardrails config {path}{where}: {field}: {first['msg']}") from None
