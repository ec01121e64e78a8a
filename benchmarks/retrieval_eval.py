"""A small retrieval evaluation against a running inferd: MRR@10 and recall@1.

Corpus: real text that ships with Python, the docstrings of standard-library modules (the first
1,200 characters of each of the modules below that has at least 150 characters of docstring).
Queries: one question per module in QUERIES, written in a user's words, not the docstring's;
its module's docstring is the one relevant passage, every other docstring a distractor.

Two ways to rank, each over the whole corpus:
- `/v1/embeddings`: passages embedded with `input_type=passage`, queries with `query`, cosine;
- `/v1/ranking` (NIM's format): each query against all passages in one request.

Usage: python benchmarks/retrieval_eval.py --url http://127.0.0.1:8000 --model all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from typing import Any

import httpx
import numpy as np

# Module -> a question whose answer is that module's documentation.
QUERIES = {
    "argparse": "How can my script read options and flags given on the command line?",
    "json": "Turn a dictionary into a JavaScript object notation string and back",
    "csv": "Read a spreadsheet exported as comma separated values",
    "sqlite3": "Store data in a small embedded SQL database file",
    "hashlib": "Compute a SHA-256 digest of some bytes",
    "random": "Pick a pseudo-random number from a distribution",
    "statistics": "Find the median and standard deviation of a list of numbers",
    "heapq": "A priority queue where the smallest item comes out first",
    "itertools": "Building blocks for efficient looping, like chaining and permutations",
    "collections": "Container types such as a counter, a deque and named tuples",
    "tempfile": "Create a scratch file that is deleted automatically",
    "subprocess": "Run another program and capture its output",
    "socket": "Low-level network connections over TCP or UDP",
    "ssl": "Encrypt a network connection with TLS certificates",
    "urllib.request": "Download a web page from a URL",
    "smtplib": "Send an e-mail through a mail server",
    "ftplib": "Transfer files to a remote server over FTP",
    "xml.etree.ElementTree": "Parse and build XML documents as a tree of elements",
    "difflib": "Show the differences between two versions of a text",
    "re": "Match text against a regular expression pattern",
    "gettext": "Translate my program's messages into other languages",
    "unittest": "Write automated test cases with assertions",
    "pdb": "Step through my program line by line to find a bug",
    "timeit": "Measure how long a small piece of code takes to run",
    "pickle": "Serialize Python objects to bytes to save them",
    "copy": "Make a deep copy of a nested object",
    "gc": "Control the garbage collector and reference cycles",
    "zlib": "Compress and decompress data with deflate",
    "struct": "Pack numbers into binary C structures",
    "uuid": "Generate universally unique identifiers",
    "wave": "Read and write WAV audio files",
    "configparser": "Read settings from an INI configuration file with sections",
    "mimetypes": "Guess the content type of a file from its extension",
    "sched": "Schedule events to run at given times",
    "turtle": "Draw graphics for kids by moving a pen around the screen",
    "inspect": "Look at the source code and signature of a live function",
}
DISTRACTORS = [
    "gzip",
    "calendar",
    "secrets",
    "fnmatch",
    "shutil",
    "http.client",
    "imaplib",
    "string",
    "unicodedata",
    "locale",
    "logging",
    "doctest",
    "trace",
    "ast",
    "shelve",
    "pprint",
    "typing",
    "io",
    "select",
    "ipaddress",
    "colorsys",
    "curses",
    "getpass",
    "platform",
    "plistlib",
    "wsgiref",
    "xmlrpc.client",
    "weakref",
    "codecs",
    "hmac",
]
PASSAGE_CHARS = 1200


def corpus() -> tuple[list[str], list[str]]:
    names, texts = [], []
    for name in [*QUERIES, *DISTRACTORS]:
        doc = " ".join((importlib.import_module(name).__doc__ or "").split())
        if len(doc) >= 150 and name not in names:
            names.append(name)
            texts.append(doc[:PASSAGE_CHARS])
    return names, texts


def scores_to_metrics(ranked: list[list[int]], relevant: list[int]) -> dict[str, float]:
    rr, hits = [], []
    for order, want in zip(ranked, relevant, strict=True):
        rank = order.index(want) + 1 if want in order[:10] else None
        rr.append(1 / rank if rank else 0.0)
        hits.append(1.0 if order[0] == want else 0.0)
    return {"mrr@10": float(np.mean(rr)), "recall@1": float(np.mean(hits))}


def embed(client: httpx.Client, model: str, texts: list[str], kind: str) -> np.ndarray:
    body = {"model": model, "input": texts, "input_type": kind, "truncate": "END"}
    r = client.post("/v1/embeddings", json=body)
    r.raise_for_status()
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    vectors = np.array([d["embedding"] for d in data], dtype=np.float32)
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    args = parser.parse_args()
    names, passages = corpus()
    questions = [q for n, q in QUERIES.items() if n in names]
    relevant = [names.index(n) for n in QUERIES if n in names]
    with httpx.Client(base_url=args.url, timeout=600) as client:
        meta = client.get("/v1/metadata").json()
        model_info: dict[str, Any] = next((m for m in meta["models"] if m["id"] == args.model), {})
        by_embedding: list[list[int]] = []
        started = time.perf_counter()
        if "embedding" in model_info:  # a cross-encoder ranks, it does not embed
            p = embed(client, args.model, passages, "passage")
            q = embed(client, args.model, questions, "query")
            by_embedding = [[int(i) for i in np.argsort(-(p @ v))] for v in q]
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        by_ranking = []
        for question in questions:
            body = {
                "model": args.model,
                "query": {"text": question},
                "passages": [{"text": t} for t in passages],
                "truncate": "END",
            }
            r = client.post("/v1/ranking", json=body)
            r.raise_for_status()
            by_ranking.append([x["index"] for x in r.json()["rankings"]])
        rank_s = time.perf_counter() - started
    result = {
        "model": args.model,
        "profile": model_info.get("profile", {}).get("id"),
        "ranking_method": model_info.get("ranking", {}).get("method"),
        "python": platform.python_version(),
        "passages": len(passages),
        "queries": len(questions),
        "embeddings": (
            {**scores_to_metrics(by_embedding, relevant), "seconds": embed_s}
            if by_embedding
            else None
        ),
        "ranking": {**scores_to_metrics(by_ranking, relevant), "seconds": rank_s},
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
