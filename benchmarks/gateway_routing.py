"""What metric-aware routing gains over round-robin, on inferd replicas: the evidence for the
inference-gateway integration (`inferd deploy k8s --gateway inference-pool`), not a router
shipped in inferd.

Starts `--replicas` `inferd serve` processes (default model and profile: llama.cpp) on loopback,
each engine limited to `--threads` threads so the replicas share the machine's cores evenly. One
seeded load (Poisson arrivals at `--rate`; prompts sharing one of four long system prompts;
uneven answers, `max_tokens` from a long-tailed mix) is sent, in alternating rounds, routed by:

- `round-robin`: what a plain Kubernetes Service does;
- `metrics`: what the endpoint picker does with the pods' metrics and the scorers its release ships
  by default, less the prefix scorer (which needs the prompts, not the metrics): it polls each
  replica's `/v1/metrics` every 50 ms (the picker's default refresh), reads only the protocol's
  gauges (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`), and picks the replica with the
  highest 2 x queue score + 2 x KV score (queue: min-max normalised, fewer waiting is better; KV:
  1 - use), ties broken at random.

Per round and policy: output throughput (tokens/s over the round's wall time) and p50/p95 time to
first token (streamed). Raw results go to `--out` as JSON.

Usage: python benchmarks/gateway_routing.py [--replicas 2] [--threads 1] [--rate 1.5]
       [--requests 80] [--rounds 3] [--cache-path DIR] [--out benchmarks/runs/gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inferd.observability import gateway_metrics as gm

MODEL = "smollm2-135m-instruct"
POLL_S = 0.05  # the picker's default metrics refresh (50 ms)
SYSTEMS = [
    f"You are assistant number {i}. " + " ".join(f"Rule {j}: {topic} matters." for j in range(60))
    for i, topic in enumerate(("accuracy", "brevity", "kindness", "safety"))
]
QUESTIONS = ["Describe a lighthouse.", "Explain rain.", "Write about trains.", "Tell a fable."]
SIZES = (16, 16, 32, 64, 128, 256)  # max_tokens: mostly short, a long tail


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the round starts
    system: int
    question: str
    max_tokens: int


@dataclass
class Outcome:
    replica: int
    ttft: float
    tokens: int


def workload(n: int, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        out.append(
            Request(at, rng.randrange(len(SYSTEMS)), rng.choice(QUESTIONS), rng.choice(SIZES))
        )
    return out


class Picker:
    """The endpoint picker's view: each replica's waiting and KV use, refreshed every 50 ms."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient) -> None:
        self.urls, self.client = urls, client
        self.waiting = [0.0] * len(urls)
        self.kv = [0.0] * len(urls)
        self.rng = random.Random(0)

    async def poll(self) -> None:
        while True:
            answers = await asyncio.gather(
                *(self.client.get(u + "/v1/metrics") for u in self.urls), return_exceptions=True
            )
            for i, answer in enumerate(answers):
                if isinstance(answer, httpx.Response) and answer.status_code == 200:
                    for family in text_string_to_metric_families(answer.text):
                        if family.name == gm.WAITING and family.samples:
                            self.waiting[i] = family.samples[0].value
                        elif family.name == gm.KV_USAGE and family.samples:
                            self.kv[i] = family.samples[0].value
            await asyncio.sleep(POLL_S)

    def pick(self) -> int:
        low, high = min(self.waiting), max(self.waiting)
        scores = []
        for w, kv in zip(self.waiting, self.kv, strict=True):
            queue = 1.0 if high == low else (high - w) / (high - low)
            scores.append(2 * queue + 2 * (1 - kv))
        best = max(scores)
        return self.rng.choice([i for i, s in enumerate(scores) if s == best])


async def send(client: httpx.AsyncClient, url: str, req: Request, replica: int) -> Outcome:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEMS[req.system]},
            {"role": "user", "content": req.question},
        ],
        "max_tokens": req.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            if ttft is None and delta.get("content"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if ttft is None:
        raise RuntimeError(f"no token from replica {replica}")
    return Outcome(replica, ttft, tokens)


async def run_round(urls: list[str], policy: str, load: list[Request]) -> dict[str, object]:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        picker = Picker(urls, client)
        poller = asyncio.create_task(picker.poll()) if policy == "metrics" else None
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(load):
            await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
            replica = picker.pick() if policy == "metrics" else i % len(urls)
            tasks.append(asyncio.create_task(send(client, urls[replica], req, replica)))
        outcomes = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        if poller:
            poller.cancel()
    ttfts = sorted(o.ttft for o in outcomes)
    return {
        "policy": policy,
        "wall_s": wall,
        "output_tok_s": sum(o.tokens for o in outcomes) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[int(0.95 * (len(ttfts) - 1))],
        "per_replica": [sum(o.replica == r for o in outcomes) for r in range(len(urls))],
    }


async def warm(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        for replica, url in enumerate(urls):
            for system in range(len(SYSTEMS)):
                await send(client, url, Request(0.0, system, QUESTIONS[0], 4), replica)


def start_replicas(
    n: int, threads: int, cache: Path, logs: Path
) -> list[tuple[subprocess.Popen[bytes], str]]:
    inferd = str(Path(sys.executable).with_name("inferd"))
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache)}
    out = []
    for i in range(n):
        port = 8600 + i
        with (logs / f"replica-{i}.log").open("wb") as log:
            proc = subprocess.Popen(
                [inferd, "serve", MODEL, "--port", str(port), f"--engine-args=--threads {threads}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        out.append((proc, f"http://127.0.0.1:{port}"))
    deadline = time.monotonic() + 600
    for proc, url in out:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"a replica exited; see {logs}")
            try:
                if httpx.get(url + "/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("replicas not ready in 10 min")
            time.sleep(1)
    return out


def machine() -> dict[str, object]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor())  # fmt: skip
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "amx": " amx_tile" in flags,
        "python": platform.python_version(),
        "inferd": metadata.version("inferd"),
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="engine threads per replica")
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second")
    parser.add_argument("--requests", type=int, default=80, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache-path",
        type=Path,
        default=Path(os.environ.get("INFERD_CACHE_PATH", Path.home() / ".cache" / "inferd")),
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/gateway"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    replicas = start_replicas(args.replicas, args.threads, args.cache_path, args.out)
    urls = [url for _, url in replicas]
    results: list[dict[str, object]] = []
    try:
        # Warm-up: every replica sees every system prompt once, so neither policy's first round
        # meets caches the other warmed (first-request costs out of the measurement too).
        asyncio.run(warm(urls))
        for r in range(args.rounds):
            load = workload(args.requests, args.rate, seed=r)
            # Alternate which policy goes first, so the machine's drift does not favour one.
            for policy in ("round-robin", "metrics") if r % 2 == 0 else ("metrics", "round-robin"):
                result = {"round": r, **asyncio.run(run_round(urls, policy, load))}
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        for proc, _ in replicas:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in replicas:
            proc.wait(timeout=120)
    summary = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "results": results}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    for policy in ("round-robin", "metrics"):
        rows = [x for x in results if x["policy"] == policy]

        def span(key: str, rows: list[dict[str, object]] = rows) -> str:
            values = sorted(float(x[key]) for x in rows)  # type: ignore[arg-type]
            return " / ".join(
                f"{v:.2f}" for v in (values[0], statistics.median(values), values[-1])
            )

        print(f"{policy:12s} tok/s {span('output_tok_s')}  TTFT p50 {span('ttft_p50_s')} s  "
              f"p95 {span('ttft_p95_s')} s  (min / median / max)")  # fmt: skip


if __name__ == "__main__":
    main()
