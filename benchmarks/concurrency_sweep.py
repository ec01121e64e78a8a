"""Throughput and latency against concurrency, to choose admission control's defaults.

Starts `inferd serve` with admission control out of the way (`--max-running 1024`), then runs
vLLM's serving benchmark (128 in / 128 out tokens, ignore_eos) at each concurrency. The default
`INFERD_MAX_RUNNING` should sit where throughput stops growing: past it, more requests at the
engine only lengthen every request's latency, and are better held (visibly, boundedly) in the
front's queue.

Usage: python benchmarks/concurrency_sweep.py [--levels 4,8,16,24,32,48] [--cache-path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_overhead import bench, free_port, wait_http  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="4,8,16,24,32,48")
    parser.add_argument(
        "--cache-path",
        type=Path,
        default=Path(os.environ.get("INFERD_CACHE_PATH", Path.home() / ".cache" / "inferd")),
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    env = {**os.environ, "INFERD_CACHE_PATH": str(args.cache_path)}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("inferd")),
            "serve",
            "--port",
            str(port),
            "--max-running",
            "1024",
            "--max-queue",
            "1024",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v1/health/ready", server)
        model_dir = Path(httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["root"])
        print("| concurrency | output tok/s | median TTFT ms | median ITL ms |")
        print("|---|---|---|---|")
        for c in levels:
            r = bench(url, model_dir, c, max(16, 4 * c))
            row = {
                "concurrency": c,
                **{k: r.get(k) for k in ("output_throughput", "median_ttft_ms", "median_itl_ms")},
            }
            print(
                f"| {c} | {row['output_throughput']:.1f} | {row['median_ttft_ms']:.0f} | "
                f"{row['median_itl_ms']:.1f} |",
                flush=True,
            )
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        time.sleep(1)


if __name__ == "__main__":
    main()
