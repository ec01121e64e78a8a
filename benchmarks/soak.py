"""A bounded soak: thousands of mixed requests against a real `inferd serve`, then the books.

The mix: streamed chats, plain chats, streams the client abandons after the first event, and
invalid requests (bad JSON, unknown model, bad field, unknown parameter). Every request must end
as completed, errored (an HTTP error or an SSE error event) or aborted by the client; none may
hang. Afterwards the front's open file descriptors and resident memory must be back near their
level before the run, and the running/waiting gauges (inferd's and the engine's) back at zero.

Usage: python benchmarks/soak.py [--requests 3000] [--concurrency 24] [--out FILE.json]
It starts its own server (eager vLLM, the default model) on a free port and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

MODEL = "smollm2-135m-instruct"
KINDS = (("stream", 0.4), ("plain", 0.3), ("abandon", 0.15), ("invalid", 0.15))
INVALID = (
    b"{not json",
    json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
    json.dumps({"model": MODEL, "messages": "x"}).encode(),
    json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}
    ).encode(),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def footprint(pid: int) -> dict[str, int]:
    proc = psutil.Process(pid)
    return {"fds": proc.num_fds(), "rss_bytes": proc.memory_info().rss}


def gauges(url: str) -> dict[str, float]:
    """inferd's counters (failures by status) and the running/waiting gauges."""
    wanted = (
        "num_requests_running{",
        "num_requests_waiting{",
        "request_success_total{",
        "vllm:num_requests_running{",
    )
    totals: dict[str, float] = collections.defaultdict(float)
    for line in httpx.get(url + "/v1/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        for name in wanted:
            if line.startswith(name):
                totals[name.rstrip("{")] += value
        if line.startswith("request_failure_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            totals[f"request_failure_total[{status}]"] += value
    return dict(totals)


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(2, 12),
        "messages": [{"role": "user", "content": f"Say {rng.random()}"}],
    }
    if kind == "invalid":
        r = await client.post(
            "/v1/chat/completions",
            content=rng.choice(INVALID),
            headers={"Content-Type": "application/json"},
        )
        return "errored" if 400 <= r.status_code < 500 else f"unexpected {r.status_code}"
    if kind == "plain":
        r = await client.post("/v1/chat/completions", json=body)
        return "completed" if r.status_code == 200 else "errored"
    body["stream"] = True
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return "errored"
        async for line in r.aiter_lines():
            if kind == "abandon" and line.startswith("data: {"):
                return "aborted"  # leaving the block closes the connection mid-stream
            if line.startswith('data: {"error"'):
                return "errored"
            if line == "data: [DONE]":
                return "completed"
    return "errored"  # the stream ended without [DONE]


async def run(url: str, requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS], k=requests)
    outcomes: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for k in kinds:
        queue.put_nowait(k)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                kind = queue.get_nowait()
                try:
                    result = await asyncio.wait_for(one(client, kind, rng), 120)
                except TimeoutError:
                    result = "hung"
                except httpx.HTTPError as exc:
                    result = f"transport error {type(exc).__name__}"
                outcomes[result] += 1
                by_kind[kind][result] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "sent": requests,
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inferd = str(Path(sys.executable).with_name("inferd"))
    log = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [inferd, "serve", "--port", str(port), "--engine-args=--enforce-eager"],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("inferd did not become ready")
            time.sleep(1)
        asyncio.run(run(url, 200, args.concurrency, args.seed + 1))  # warm-up
        time.sleep(3)
        before, metrics_before = footprint(server.pid), gauges(url)
        result = asyncio.run(run(url, args.requests, args.concurrency, args.seed))
        time.sleep(5)
        after, metrics_after = footprint(server.pid), gauges(url)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    counted = {
        k: metrics_after.get(k, 0) - metrics_before.get(k, 0)
        for k in metrics_after
        if k.startswith("request_")
    }
    report = {
        **result,
        "front_before": before,
        "front_after": after,
        "metrics_delta": counted,
        "gauges_after": metrics_after,
        "exit_code": code,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
