"""Models on demand (issue 17): what a cold model costs its first request, and swap churn.

1. *Cold start*, per engine: a streamed completion to a model whose engine is not running, timed
   to its first token (the request waits for the engine to start and load the model), beside the
   same request once the model is loaded (warm). llama.cpp: the three models of
   tests/e2e/test_on_demand.py under `--max-loaded 1`, each made cold again by loading another
   (`--cold-runs` times each). vLLM (part `vllm`) and both engines behind the model (part
   `both`, `cpu-both`: answered by llama.cpp, vLLM joining behind it): SmolLM2, the first
   request of a fresh service, `--cold-runs` times, with how long every engine took to answer.
2. *Swap churn*: the three models on llama.cpp, one loaded at a time, `--requests` completions
   (8 tokens) in random order from `--users` concurrent clients: completed, refused (503 +
   Retry-After), loads and unloads, and latency p50/p95 of the completed ones (a request that
   triggers a swap waits for the other model's requests to finish, then for a load).

Each part runs its own `inferd serve` (the e2e helpers' start, the shared test cache), stopped
afterwards. Printed as tables, and written as JSON (`--out`).

Usage: python benchmarks/on_demand.py [--cold-runs 3] [--requests 200] [--users 8]
       [--parts cold,vllm,both,churn] [--out benchmarks/runs/on_demand.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the e2e helpers: one definition of the three-model service

from tests.e2e.conftest import Served, start  # noqa: E402
from tests.e2e.test_on_demand import MODELS, QWEN, SMOL, _serve  # noqa: E402

PROMPT = "The sky is"


def first_token_s(served: Served, model: str) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    began = time.perf_counter()
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        took = None
        for line in r.iter_lines():  # read to the end: the request ends cleanly
            if took is None and line.startswith("data: ") and '"text"' in line:
                took = time.perf_counter() - began
    if took is None:
        raise RuntimeError(f"no token from {model}")
    return took


def state(served: Served, model: str) -> str:
    data = httpx.get(served.url + "/v1/models", timeout=10).json()["data"]
    return str(next(m["state"] for m in data if m["id"] == model))


def cold_llamacpp(tmp: Path, runs: int) -> dict[str, Any]:
    served = _serve(tmp, "--max-loaded", "1")
    try:
        out: dict[str, Any] = {}
        for model in MODELS:
            other = SMOL if model != SMOL else QWEN
            cold, warm = [], []
            for _ in range(runs):
                first_token_s(served, other)  # loads the other one: `model` is unloaded
                assert state(served, model) == "unloaded"
                cold.append(first_token_s(served, model))
                warm.append(first_token_s(served, model))
            out[model] = {"cold_s": cold, "warm_s": warm}
        return out
    finally:
        served.stop()


def cold_profile(tmp: Path, profile: str, runs: int) -> dict[str, Any]:
    """SmolLM2 on `profile` on demand, the service's first request, `runs` times (a fresh
    service each: vLLM takes a minute or more to start here). For a combined profile, also how
    long after that request its later engine joined."""
    cold, warm, joined = [], [], []
    for run in range(runs):
        folder = tmp / f"{profile}-{run}"
        folder.mkdir(parents=True, exist_ok=True)
        args = ("--profile", profile, "--idle-unload-s", "3600", "--load-timeout-s", "600")
        served = start(folder, SMOL, *args)
        try:
            served.wait_ready()
            began = time.perf_counter()
            cold.append(first_token_s(served, SMOL))
            warm.append(first_token_s(served, SMOL))
            served.wait_all_engines(timeout=900)
            joined.append(time.perf_counter() - began)
        finally:
            served.stop()
    return {SMOL: {"cold_s": cold, "warm_s": warm, "all_engines_s": joined}}


def churn(tmp: Path, requests: int, users: int) -> dict[str, Any]:
    served = _serve(tmp, "--max-loaded", "1")
    order = [MODELS[i % len(MODELS)] for i in range(requests)]
    random.Random(3).shuffle(order)

    def ask(model: str) -> tuple[int, float]:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8}
        began = time.perf_counter()
        r = httpx.post(served.url + "/v1/completions", json=body, timeout=600)
        return r.status_code, time.perf_counter() - began

    try:
        began = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            results = list(pool.map(ask, order))
        wall = time.perf_counter() - began
        metrics = httpx.get(served.url + "/v1/metrics", timeout=10).text
    finally:
        served.stop()
    done = sorted(t for s, t in results if s == 200)
    loads = sum(
        float(v) for v in re.findall(r"^inferd_model_loads_total\{.*\} (\S+)$", metrics, re.M)
    )
    unloads = sum(
        float(v) for v in re.findall(r"^inferd_model_unloads_total\{.*\} (\S+)$", metrics, re.M)
    )
    return {
        "requests": requests,
        "users": users,
        "completed": len(done),
        "refused_503": sum(s == 503 for s, _ in results),
        "other": sorted({s for s, _ in results} - {200, 503}),
        "p50_s": statistics.median(done) if done else None,
        "p95_s": done[max(0, round(0.95 * len(done)) - 1)] if done else None,
        "wall_s": wall,
        "loads": loads,
        "unloads": unloads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument(
        "--parts",
        default="cold,churn",
        help="comma-separated: cold (llama.cpp), vllm (vLLM's cold start: minutes), both "
        "(cpu-both's), churn",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="on-demand-bench-"))
    results: dict[str, Any] = {"cold": {}}
    if "cold" in parts:
        results["cold"]["llamacpp"] = cold_llamacpp(tmp / "cold", args.cold_runs)
    for part, profile in (("vllm", "vllm-cpu-bf16"), ("both", "cpu-both")):
        if part in parts:
            results["cold"][profile] = cold_profile(tmp / part, profile, args.cold_runs)
    if "churn" in parts:
        results["churn"] = churn(tmp / "churn", args.requests, args.users)
    report(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


def report(results: dict[str, Any]) -> None:
    """The results as the tables of benchmarks/RESULTS.md."""
    print("| engine | model | cold first token (s), runs | warm (s) | every engine (s) |")
    print("|---|---|---|---|---|")
    for engine, models in results["cold"].items():
        for model, r in models.items():
            every = ", ".join(f"{s:.1f}" for s in r.get("all_engines_s", [])) or "-"
            print(
                f"| {engine} | {model} | {', '.join(f'{s:.2f}' for s in r['cold_s'])} | "
                f"{statistics.median(r['warm_s']):.3f} | {every} |"
            )
    c = results.get("churn")
    if c is None:
        return
    print()
    print("| requests | users | completed | refused (503) | p50 (s) | p95 (s) | loads | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {c['requests']} | {c['users']} | {c['completed']} | {c['refused_503']} | "
        f"{c['p50_s']:.2f} | {c['p95_s']:.2f} | {c['loads']:g} | {c['wall_s']:.1f} |"
    )


if __name__ == "__main__":
    main()
