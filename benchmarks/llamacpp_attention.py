"""llama-server's attention settings on this machine: flash-attention on/off and the KV cache types.

For each setting (llama-server flags after `--`), started fresh in every round, on the GGUF the
latency profile serves, llama-server's own timings (no front, no HTTP client timing) for:

- a 128-token prompt and a 1024-token prompt (random token ids, no prompt cache), 128 generated
  tokens each: prompt milliseconds and milliseconds per generated token;
- 4 clients at once (8 requests of 128 in / 128 out): output tokens per second.

"one user, 128/128" estimates what a one-user benchmark of 128 in / 128 out would see
(prompt + 127 tokens) without the client's own costs.

Usage: python benchmarks/llamacpp_attention.py [--rounds 2] [--cache-path DIR]
           [--settings ";-fa off;-ctk q8_0 -ctv q8_0"]   (settings separated by ';', empty =
           llama-server's defaults)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inferd.engines.llamacpp import find_binary
from serve_overhead import MODEL, free_port, wait_http

DEFAULT_SETTINGS = ";".join(
    [
        "",
        "-fa off",
        "-ctk q8_0 -ctv q8_0",
        "-ctk bf16 -ctv bf16",
        "-fa off -ctk q8_0",
        "-fa off -ctk q8_0 -ctv bf16",
    ]
)


def complete(port: int, prompt_tokens: int, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    body = {
        "prompt": [rnd.randint(1000, 40000) for _ in range(prompt_tokens)],
        "n_predict": 128,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        timings: dict[str, Any] = json.loads(resp.read())["timings"]
    return timings


def measure(binary: str, gguf: Path, flags: list[str], rnd: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-m", str(gguf), "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=30)
        complete(port, 16, 0)  # warm-up
        short = [complete(port, 128, 10 * rnd + i) for i in range(4)]
        long = [complete(port, 1024, 10 * rnd + i) for i in range(2)]
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: complete(port, 128, 100 + i), range(8)))
        four = 8 * 128 / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait()
    return {
        "prompt128_ms": statistics.median(t["prompt_ms"] for t in short),
        "token128_ms": statistics.median(t["predicted_per_token_ms"] for t in short),
        "prompt1024_ms": statistics.median(t["prompt_ms"] for t in long),
        "token1024_ms": statistics.median(t["predicted_per_token_ms"] for t in long),
        "four_users_tok_s": four,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-path", type=Path, default=Path("~/.cache/inferd").expanduser())
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the shipped Q4_1 file)")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    args = parser.parse_args()
    binary = find_binary()
    if binary is None:
        raise SystemExit("llama-server is not installed (make install)")
    gguf = args.gguf or next((args.cache_path / "models" / MODEL / "gguf-q4_1").glob("*.gguf"))
    settings = args.settings.split(";")
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for rnd in range(args.rounds):
        for flags in settings[rnd % len(settings) :] + settings[: rnd % len(settings)]:
            row = measure(binary, gguf, flags.split(), rnd)
            rows[flags].append(row)
            print(json.dumps({"settings": flags or "(defaults)", "round": rnd, **row}), flush=True)
    keys = ["prompt128_ms", "token128_ms", "prompt1024_ms", "token1024_ms", "four_users_tok_s"]
    print(
        "\n| settings | prompt 128 ms | ms/token at 128 | prompt 1024 ms | ms/token at 1024 "
        "| 4 users tok/s | one user, 128/128 tok/s |\n|---|---|---|---|---|---|---|"
    )
    for flags, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        one = 128_000 / (med["prompt128_ms"] + 127 * med["token128_ms"])
        cells = " | ".join(f"{med[k]:.2f}" if "token" in k else f"{med[k]:.0f}" for k in keys)
        print(f"| `{flags or '(defaults)'}` | {cells} | {one:.0f} |")


if __name__ == "__main__":
    main()
