"""One rail's verdict on one text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    rail: str
    blocked: bool
    action: str
    categories: list[str] = field(default_factory=list)
    score: float = 0.0
    ms: float = 0.0
    redacted: str | None = None
    error: str | None = None  # a guard model gave no usable verdict (on_error decided)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rail": self.rail,
            "blocked": self.blocked,
            "action": self.action,
            "categories": self.categories,
            "score": self.score,
            "ms": round(self.ms, 3),
        }
        if self.redacted is not None:
            out["redacted"] = self.redacted
        if self.error is not None:
            out["error"] = self.error
        return out
