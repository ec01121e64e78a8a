"""What a LoRA adapter costs: output rate with the adapter vs the base model, per engine.

One `inferd serve --lora-path DIR` per engine profile (llama.cpp Q8_0, vLLM bf16; `--profiles`
adds `cpu-both`, both engines behind the model, measured once both have joined), serving the
default model and the adapter trained by tests/adapters/train_lora.py (rank 8 on every attention
and MLP projection). On that one server, vLLM's serving benchmark (128 in / 128 out tokens,
ignore_eos) alternates between `model=<base>` and `model=<adapter>` at each concurrency, for
`--rounds` rounds, so drift on a shared machine hits both alike. Also: the same vLLM profile
without `--lora-path` once per round (vLLM's CPU build turns torch.compile off whenever LoRA is
enabled, which costs base requests too), when `--plain-vllm` is given.

Usage: python benchmarks/adapter_cost.py [--rounds 2] [--concurrency 1,16] [--plain-vllm]
       [--profiles llamacpp-cpu-q8_0,vllm-cpu-bf16,cpu-both]
Prints a markdown table (medians over rounds) and writes every raw result as JSON under --out.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from serve_overhead import MODEL, bench, environment, free_port, rounds_parser, stop, wait_http

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.adapters import train_lora  # noqa: E402 - the repository's own test helper

INFERD = str(Path(sys.executable).with_name("inferd"))
PROFILES = ("llamacpp-cpu-q8_0", "vllm-cpu-bf16")
ADAPTER = train_lora.ADAPTER_NAME


def serve(
    profile: str, cache: Path, lora: Path | None, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [INFERD, "serve", "--profile", profile, "--port", str(port)]
    if lora is not None:
        args += ["--lora-path", str(lora)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "INFERD_CACHE_PATH": str(cache)},
            start_new_session=True,  # `stop` signals the process group
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/health/ready", proc, timeout=900)
    _until_every_engine_ready(url, timeout=900)
    return proc, url


def _until_every_engine_ready(url: str, timeout: float) -> None:
    """With several engines behind the model, ready means the first: wait for the others too,
    so the figures are those of the profile running whole."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = httpx.get(url + "/v1/metadata", timeout=10).json()
        engines = meta["models"][0].get("engines") or []
        if all(e["state"] == "ready" for e in engines):
            return
        time.sleep(1)
    raise SystemExit(f"not every engine of {url} was ready within {timeout:.0f} s")


def main() -> None:
    parser = rounds_parser(__doc__)
    parser.set_defaults(rounds=2)
    parser.add_argument("--plain-vllm", action="store_true")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    args = parser.parse_args()
    profiles = args.profiles.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.cache_path / "models" / MODEL / "safetensors-bf16"
    adapter = train_lora.cached_adapter(base)
    lora = Path(tempfile.mkdtemp(prefix="adapters-"))
    shutil.copytree(adapter, lora / ADAPTER)
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        setups: list[tuple[str, Path | None]] = [(p, lora) for p in profiles]
        if args.plain_vllm:
            setups.append(("vllm-cpu-bf16", None))
        for profile, folder in setups:
            log = args.out / f"{profile}-{rnd}-{'lora' if folder else 'plain'}.log"
            proc, url = serve(profile, args.cache_path, folder, log)
            try:
                for level in levels:
                    models = [MODEL, ADAPTER] if folder else [MODEL]
                    if rnd % 2:
                        models.reverse()
                    for model in models:
                        result = bench(url, base, level, max(8, 4 * level), model=model)
                        setup = profile if folder else f"{profile} without --lora-path"
                        row = {"setup": setup, "model": model, "concurrency": level, **result}
                        rows.append(row)
                        print(json.dumps({k: row[k] for k in list(row)[:3]}), flush=True)
            finally:
                stop(proc)
    (args.out / "adapter_cost.json").write_text(json.dumps(rows, indent=2))
    print(summarize(rows))
    print(environment())


def summarize(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setup | model | users | output tok/s | TTFT median ms | ITL median ms |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["setup"], r["concurrency"], r["model"]) for r in rows})
    for setup, level, model in keys:
        mine = [
            r for r in rows if (r["setup"], r["concurrency"], r["model"]) == (setup, level, model)
        ]
        rate = statistics.median(r["output_throughput"] for r in mine)
        ttft = statistics.median(r["median_ttft_ms"] for r in mine)
        itl = statistics.median(r["median_itl_ms"] for r in mine)
        name = "adapter" if model == ADAPTER else "base"
        lines.append(f"| {setup} | {name} | {level} | {rate:.1f} | {ttft:.0f} | {itl:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
