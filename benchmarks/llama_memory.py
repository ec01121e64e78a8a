"""llama.cpp's first token alone and beside a stopped process holding memory, taken apart.

In `cpu-both`, one user's first token on llama.cpp was later than on llama.cpp alone while
vLLM rested (stopped, no CPU) holding about 5 GB (benchmarks/RESULTS.md). This measures that
without vLLM: llama-server is started exactly as inferd starts it for the profile
(`LlamaCppEngine.command`: its argv and environment, on a Unix socket in a private folder),
either alone or beside a Python process that has written `--beside-gib` GiB (every page
touched) and stopped itself (SIGSTOP): a resting vLLM's footprint, without its code. Per
condition, `--requests` sequential streamed completions of a fixed prompt with 128 tokens out
(ignore_eos, no prompt cache), each on a new connection (llama-server closes a connection after
a stream anyway); reported, medians with the first request of a start left out: the time to the
response's headers, to the first token, llama.cpp's own prompt time and decode rate (its
`timings`), its RSS and the huge pages it holds. Each `--variant NAME=VAR=VALUE[,VAR=VALUE]`
adds that environment to llama-server's (default: as inferd starts it, and with llama-server's
own prompt cache in RAM, `LLAMA_ARG_CACHE_RAM=8192`, as before inferd turned it off; e.g.
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for malloc's memory in huge pages). Conditions rotate
within each of `--rounds` rounds, so drift hits all alike.

Usage: python benchmarks/llama_memory.py [--profile llamacpp-cpu-q8_0] [--rounds 3]
       [--requests 12] [--beside-gib 5] [--variant NAME=VAR=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from engine_profiles import environment, median_spread
from inferd.cache import prepare
from inferd.cli.plan import resolve
from inferd.config import load_settings
from inferd.server.engine_link import BASE_URL
from serve_overhead import wait_http

MODEL = "smollm2-135m-instruct"
PROMPT = " ".join(f"word{i}" for i in range(50))
HOLD = """import os, signal, sys
held = bytearray(int(sys.argv[1]) << 30)
for i in range(0, len(held), 4096):
    held[i] = 1
print("held", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def client(socket: Path, env: dict[str, str]) -> httpx.Client:
    fresh = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(
        base_url=BASE_URL,
        transport=httpx.HTTPTransport(uds=str(socket), limits=fresh),
        headers={"Authorization": f"Bearer {env['LLAMA_API_KEY']}"},
        timeout=120,
    )


def measure(c: httpx.Client, requests: int, tag: str) -> dict[str, float]:
    headers, first, prompt_ms, rate = [], [], [], []
    for k in range(requests):
        body = {
            "prompt": f"{tag}-{k} {PROMPT}",
            "n_predict": 128,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
        }
        began, seen = time.perf_counter(), None
        timings: dict[str, Any] = {}
        with c.stream("POST", "/completion", json=body) as r:
            r.raise_for_status()
            answered = time.perf_counter() - began
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                seen = seen or time.perf_counter() - began
                event = json.loads(line.removeprefix("data:"))
                timings = event.get("timings") or timings
        if k:  # the first request of a start warms llama.cpp's buffers
            headers.append(answered * 1000)
            first.append((seen or 0.0) * 1000)
            prompt_ms.append(float(timings["prompt_ms"]))
            rate.append(float(timings["predicted_per_second"]))
    return {
        "headers_ms": statistics.median(headers),
        "first_token_ms": statistics.median(first),
        "prompt_ms": statistics.median(prompt_ms),
        "decode_tok_s": statistics.median(rate),
    }


def anon_huge_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="llamacpp-cpu-q8_0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--beside-gib", type=int, default=5)
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME=VAR=VALUE[,VAR=VALUE]: environment for llama-server (repeatable; default: "
        "as inferd starts it, and with its prompt cache in RAM)",
    )
    args = parser.parse_args()
    settings = load_settings({"model": MODEL, "profile": args.profile})
    plan = resolve(settings)
    plan.store.ensure_writable()  # a cache not made yet: its folders, locks included
    prepare(plan.entry, plan.chosen.profile, plan.store, index_url=settings.pypi_index_url)
    variants = dict(
        v.split("=", 1)
        for v in args.variant
        or ["as inferd starts it=", "prompt cache in RAM=LLAMA_ARG_CACHE_RAM=8192"]
    )
    conditions = [(variant, beside) for beside in (False, True) for variant in variants]
    results: dict[str, list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        shift = rnd % len(conditions)
        for variant, beside in conditions[shift:] + conditions[:shift]:
            name = f"{variant}, " + (f"beside {args.beside_gib} GiB stopped" if beside else "alone")
            holder = None
            if beside:
                holder = subprocess.Popen(
                    [sys.executable, "-c", HOLD, str(args.beside_gib)], stdout=subprocess.PIPE
                )
                assert holder.stdout is not None
                holder.stdout.readline()
            with tempfile.TemporaryDirectory() as folder:
                socket = Path(folder) / "engine-1.sock"
                cmd = plan.engine(settings).command(socket)
                extra = dict(item.split("=", 1) for item in variants[variant].split(",") if item)
                env = {
                    **os.environ,
                    **cmd.env,
                    **extra,
                    "LLAMA_API_KEY": os.urandom(16).hex(),
                }
                engine = subprocess.Popen(cmd.argv, env=env, stdout=subprocess.DEVNULL)
                wait_http(BASE_URL + "/health", engine, timeout=120, uds=socket)
                try:
                    with client(socket, env) as c:
                        row = measure(c, args.requests, f"{rnd}{variant}{beside}")
                    row["anon_huge_mib"] = anon_huge_mib(engine.pid)
                    row["rss_mib"] = psutil.Process(engine.pid).memory_info().rss / 2**20
                finally:
                    engine.terminate()
                    engine.wait()
                    if holder is not None:
                        holder.send_signal(signal.SIGKILL)
                        holder.wait()
            results.setdefault(name, []).append(row)
            print(f"round {rnd} {name}: {row}", file=sys.stderr, flush=True)

    print(f"\n{args.profile}, {args.rounds} rounds, median (min-max) of the rounds' medians")
    print(
        "\n| condition | headers ms | first token ms | prompt ms | decode tok/s "
        "| RSS MiB | AnonHugePages MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    keys = ("headers_ms", "first_token_ms", "prompt_ms", "decode_tok_s", "rss_mib", "anon_huge_mib")
    for name, rows in results.items():
        cells = [median_spread([r[k] for r in rows]) for k in keys]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\n{environment()}")


if __name__ == "__main__":
    main()
