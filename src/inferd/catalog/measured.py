"""Profiles measured on the machine they run on: the hardware fingerprint and the stored figures.

The catalog's rules rank profiles by measurements made elsewhere; `inferd tune` (and `serve`, in
the background) measures them here instead, with `bench.tune`'s short fixed benchmark, and keeps
the figures in the model cache, one file per machine kind:
`<cache>/measurements/<fingerprint>.json`. A fingerprint is what decides engine speed and can be
read without running anything: the CPU model, the ISA features profiles care about
(`hardware.CPU_FEATURES`), the usable cores, and the GPUs. Two machines with the same
fingerprint share figures (a copied cache, a cluster of identical nodes); any change (a new CPU
quota, a GPU added) starts afresh. `profiles` ranks by a `Measurement` when it has one;
nothing here knows how figures are made, and the only I/O is `load` and `save`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inferd.catalog.hardware import Hardware

FOLDER = "measurements"
# Bumped when the benchmark changes what its figures mean: older files are then ignored.
FORMAT = 1
# What ranking by measurements compares (documented in docs/profiles.md): one user's
# end-to-end time for 128 prompt tokens and 128 output tokens.
TYPICAL_PROMPT, TYPICAL_OUTPUT = 128, 128
# And, between files of one engine, that of this many users arriving together (fewer where the
# profile runs fewer at once): see `catalog.profiles`.
CROWD = 4


class Rooted(Protocol):
    """A model cache (`cache.ModelStore`): only its folder is needed here, and the catalog sits
    below the cache in inferd's layers, so it is named by shape, not imported."""

    root: Path


@dataclass(frozen=True)
class Fingerprint:
    id: str  # 12 hex digits, stable across runs and machines of the same kind
    description: str  # the same facts, readable
    facts: Mapping[str, Any]


def fingerprint(hw: Hardware) -> Fingerprint:
    cpu = hw.cpu
    gpus = sorted(g.name for g in hw.gpus)
    facts: dict[str, Any] = {
        "arch": cpu.arch,
        "cpu": cpu.model_name,
        "features": sorted(cpu.features),
        "cores": cpu.usable_cores,
        "gpus": gpus,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    on_gpu = ", ".join(f"{gpus.count(n)} x {n}" for n in sorted(set(gpus))) or "no GPU"
    features = " ".join(sorted(cpu.features)) or "no listed features"
    description = (
        f"{cpu.model_name} ({cpu.arch}), {cpu.usable_cores} usable cores, {features}; {on_gpu}"
    )
    return Fingerprint(digest, description, facts)


def _line(points: Mapping[int, float], x: float, *, rising: bool) -> float:
    """Piecewise-linear through `points`, extended past both ends along the end segments.
    `rising`: past the last point the line never falls (a noisy last pair must not promise that
    more load is faster)."""
    xs = sorted(points)
    if not xs:
        raise ValueError("no measured points")
    if len(xs) == 1:
        return points[xs[0]]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = points[x0], points[x1]
    slope = (y1 - y0) / (x1 - x0)
    if x > x1:
        return y1 + (max(slope, 0.0) if rising else slope) * (x - x1)
    return y0 + slope * (x - x0)


@dataclass(frozen=True)
class Measurement:
    model: str
    profile: str
    engine: str
    fingerprint: str
    prompt_ms: dict[int, float]  # prompt tokens -> time to first token (ms), alone, max_tokens 1
    step_ms: dict[int, float]  # requests running at once -> median time between output tokens
    ready_s: float  # engine start to ready
    measured_at: str  # ISO time (UTC)

    def prompt_time(self, tokens: int) -> float:
        """Milliseconds to the first token of a `tokens`-long prompt, one request alone."""
        return max(0.0, _line(self.prompt_ms, tokens, rising=False))

    def step_time(self, running: int) -> float:
        """Milliseconds between output tokens with `running` requests at once."""
        if running <= min(self.step_ms):
            return self.step_ms[min(self.step_ms)]
        return _line(self.step_ms, running, rising=True)

    def rate(self, running: int) -> float:
        """Output tokens per second of all `running` requests together."""
        return running * 1000.0 / self.step_time(running)

    def single_user_ms(self, prompt: int = TYPICAL_PROMPT, output: int = TYPICAL_OUTPUT) -> float:
        """One request alone, start to last token: prompt, then a step per further token."""
        return self.prompt_time(prompt) + (output - 1) * self.step_time(1)

    def together_ms(
        self, users: int, prompt: int = TYPICAL_PROMPT, output: int = TYPICAL_OUTPUT
    ) -> float:
        """`users` requests arriving together, start to last token: their prompts as one batch
        (the engines batch them), then a step of `users` running per further token."""
        return self.prompt_time(users * prompt) + (output - 1) * self.step_time(users)

    @property
    def date(self) -> str:
        return self.measured_at[:10]

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "prompt_ms": {str(k): round(v, 2) for k, v in sorted(self.prompt_ms.items())},
            "step_ms": {str(k): round(v, 3) for k, v in sorted(self.step_ms.items())},
            "ready_s": round(self.ready_s, 2),
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_json(cls, model: str, profile: str, fp: str, data: Mapping[str, Any]) -> Measurement:
        return cls(
            model=model,
            profile=profile,
            engine=str(data["engine"]),
            fingerprint=fp,
            prompt_ms={int(k): float(v) for k, v in data["prompt_ms"].items()},
            step_ms={int(k): float(v) for k, v in data["step_ms"].items()},
            ready_s=float(data["ready_s"]),
            measured_at=str(data["measured_at"]),
        )


def path(store: Rooted, fp: Fingerprint | str) -> Path:
    digest = fp if isinstance(fp, str) else fp.id
    return store.root / FOLDER / f"{digest}.json"


def _read(file: Path) -> dict[str, Any]:
    """The file's content, or an empty record when it is missing, unreadable or of another
    format (figures are a cache: a bad file is measured again, never an error)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    return data


def load(store: Rooted, fp: Fingerprint, model: str) -> dict[str, Measurement]:
    """This machine kind's measurements of `model`, by profile id (empty when none)."""
    found: dict[str, Measurement] = {}
    for profile, data in (_read(path(store, fp)).get("models", {}).get(model) or {}).items():
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
            m = Measurement.from_json(model, profile, fp.id, data)
            if m.prompt_ms and m.step_ms:
                found[profile] = m
    return found


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    # `inferd tune` and a serving process's background tuning may save at once: each reads,
    # adds its figures and replaces the file under this lock, so neither loses the other's.
    with (folder / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save(store: Rooted, m: Measurement, description: str = "") -> None:
    """Add (or replace) `m` in its machine kind's file, atomically: a reader sees the old file
    or the new one, never half of one. `description`: the fingerprint's, kept for people."""
    file = path(store, m.fingerprint)
    file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(file.parent):
        data = _read(file) or {"format": FORMAT, "fingerprint": m.fingerprint, "models": {}}
        if description:
            data["description"] = description
        data.setdefault("models", {}).setdefault(m.model, {})[m.profile] = m.to_json()
        fd, staged = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=2, sort_keys=True)
                out.write("\n")
            os.replace(staged, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
