"""Embedding throughput and fidelity of an OpenAI `/v1/embeddings` server.

256 sentences of real text (from standard-library docstrings) in batches of 32, three timed
passes after a warm-up; then the cosine of every served vector with sentence-transformers' own
encoding of the model folder given (the reference). Works against inferd or an engine alone.

Usage: python benchmarks/embedding_throughput.py --url http://127.0.0.1:8000/v1/embeddings
           --model all-minilm-l6-v2
           --reference ~/.cache/inferd/models/all-minilm-l6-v2/safetensors-fp32
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import httpx
import numpy as np

MODULES = [
    "argparse",
    "json",
    "csv",
    "sqlite3",
    "hashlib",
    "random",
    "statistics",
    "heapq",
    "itertools",
    "collections",
    "tempfile",
    "subprocess",
    "socket",
    "ssl",
    "smtplib",
    "ftplib",
    "difflib",
    "re",
    "gettext",
    "unittest",
    "pdb",
    "timeit",
    "pickle",
    "copy",
    "gc",
    "zlib",
    "struct",
    "uuid",
    "wave",
    "configparser",
    "mimetypes",
    "sched",
]


def sentences(count: int = 256) -> list[str]:
    found: list[str] = []
    for name in MODULES:
        doc = " ".join((importlib.import_module(name).__doc__ or "").split())
        found += [s.strip() for s in doc.split(". ") if 20 < len(s) < 400][:8]
    return (found * (count // len(found) + 1))[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", required=True, help="sentence-transformers folder")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    texts = sentences()
    client = httpx.Client(timeout=120)
    client.post(args.url, json={"model": args.model, "input": texts[:4]}).raise_for_status()
    passes: list[float] = []
    vectors: list[list[float]] = []
    for _ in range(3):
        started, vectors = time.perf_counter(), []
        for i in range(0, len(texts), args.batch):
            r = client.post(
                args.url, json={"model": args.model, "input": texts[i : i + args.batch]}
            )
            r.raise_for_status()
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            vectors += [d["embedding"] for d in data]
        passes.append(time.perf_counter() - started)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(args.reference, device="cpu").encode(texts)
    served = np.array(vectors)
    cosines = np.sum(
        served
        / np.linalg.norm(served, axis=1, keepdims=True)
        * reference
        / np.linalg.norm(reference, axis=1, keepdims=True),
        axis=1,
    )
    print(
        json.dumps(
            {
                "sentences": len(texts),
                "seconds": [round(p, 2) for p in passes],
                "sentences_per_s_median": round(len(texts) / statistics.median(passes), 1),
                "cosine_min": float(cosines.min()),
            }
        )
    )


if __name__ == "__main__":
    main()
