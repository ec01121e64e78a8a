"""What translating an API costs: `/v1/responses` and `/v1/messages` against
`/v1/chat/completions`, streamed, on one `inferd serve` (the same engine for all three).

Each request asks for the same kind of answer on each route: a ~128-token prompt (a fresh
number in front, so no engine answers from its prompt cache), greedy decoding, at most 128 output
tokens. Requests go one at a time (one user), the three routes in turn within each round, so
drift on a shared machine hits all three alike; `--rounds` rounds of `--requests` requests per
route. Per request, from the client's side: the time to the first text delta (TTFT) and the
output rate (completion tokens over the time from the first to the last text delta). Per round,
the median of each; the table gives min/median/max over rounds, and the paired TTFT difference
(each translated request minus the chat request before it in the same round).

Usage: python benchmarks/translation_cost.py [--profile llamacpp-cpu-q8_0] [--rounds 5]
       [--requests 10] [--out DIR]
Prints a markdown table and writes the raw measurements as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from serve_overhead import free_port

MODEL = "smollm2-135m-instruct"
HERE = Path(__file__).resolve().parent
INFERD = str(Path(sys.executable).with_name("inferd"))
# About 128 tokens with SmolLM2's tokenizer and chat template (checked with /v1/tokenize).
PROMPT = (
    "You are helping a team write the documentation of a small inference service. Write a long, "
    "detailed and friendly guide that explains, step by step, how to install the service on a "
    "fresh Linux machine, how to start it with the default model, how to send a first request "
    "with the official OpenAI client, how to read the health and metrics routes, how to protect "
    "the service with API keys, and how to shut it down cleanly without losing any request. "
    "Use short paragraphs and plain words, and give a concrete example for every step."
)
MAX_TOKENS = 128
ROUTES = ("chat", "responses", "messages")


def _body(route: str, nonce: int) -> tuple[str, dict[str, Any]]:
    # A prompt no request has sent before: engines reuse the cached prefix of a repeated prompt,
    # which would make the first token a measure of the cache, not of the prompt.
    text = f"[request {nonce}] {PROMPT}"
    user = [{"role": "user", "content": text}]
    if route == "chat":
        return "/v1/chat/completions", {
            "model": MODEL,
            "messages": user,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    if route == "responses":
        return "/v1/responses", {
            "model": MODEL,
            "input": text,
            "max_output_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "store": False,
        }
    return "/v1/messages", {
        "model": MODEL,
        "messages": user,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data:") and line.strip() != "data: [DONE]":
            yield json.loads(line[5:])


def _text_and_tokens(route: str, event: dict[str, Any]) -> tuple[bool, int | None]:
    """(whether the event carries answer text, the output token count it reports, if any)."""
    if route == "chat":
        usage = event.get("usage")
        choices = event.get("choices") or []
        text = bool(choices and (choices[0].get("delta") or {}).get("content"))
        return text, usage.get("completion_tokens") if usage else None
    if route == "responses":
        if event.get("type") == "response.completed":
            return False, event["response"]["usage"]["output_tokens"]
        return event.get("type") == "response.output_text.delta", None
    if event.get("type") == "message_delta":
        return False, event["usage"]["output_tokens"]
    delta = event.get("delta") or {}
    return event.get("type") == "content_block_delta" and delta.get("type") == "text_delta", None


def one(client: httpx.Client, route: str, nonce: int) -> dict[str, float]:
    path, body = _body(route, nonce)
    start = time.perf_counter()
    first = last = None
    tokens = None
    with client.stream("POST", path, json=body) as resp:
        resp.raise_for_status()
        for event in _events(resp.iter_lines()):
            text, counted = _text_and_tokens(route, event)
            if text:
                last = time.perf_counter()
                first = first or last
            if counted is not None:
                tokens = counted
    if first is None or last is None or not tokens:
        raise SystemExit(f"{route}: no text or no token count in the answer")
    return {
        "ttft_ms": (first - start) * 1000,
        "tokens": tokens,
        "rate": (tokens - 1) / (last - first) if last > first else 0.0,
    }


def serve(profile: str | None, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [INFERD, "serve", "--port", str(port)] + (["--profile", profile] if profile else [])
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"inferd exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/v1/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("inferd not ready after 900 s")


def measure(url: str, rounds: int, requests: int) -> list[dict[str, Any]]:
    results = []
    nonce = int(time.time())
    with httpx.Client(base_url=url, timeout=300) as client:
        for route in ROUTES:  # warm-up: each route once, not recorded
            nonce += 1
            one(client, route, nonce)
        for r in range(rounds):
            samples: dict[str, list[dict[str, float]]] = {route: [] for route in ROUTES}
            for _ in range(requests):
                for route in ROUTES:
                    nonce += 1
                    samples[route].append(one(client, route, nonce))
            results.append({"round": r, "samples": samples})
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def _spread(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}} / {statistics.median(values):{fmt}} / {max(values):{fmt}}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| route | output tok/s (min / median / max over rounds) | vs chat | "
        "median TTFT ms | paired TTFT - chat, ms |",
        "|---|---|---|---|---|",
    ]
    per_round = {
        route: {
            key: [statistics.median(s[key] for s in r["samples"][route]) for r in results]
            for key in ("rate", "ttft_ms", "tokens")
        }
        for route in ROUTES
    }
    chat_rate = statistics.median(per_round["chat"]["rate"])
    for route in ROUTES:
        rate = per_round[route]["rate"]
        paired = [
            statistics.median(
                t["ttft_ms"] - c["ttft_ms"]
                for t, c in zip(r["samples"][route], r["samples"]["chat"], strict=True)
            )
            for r in results
        ]
        rows.append(
            f"| `{route}` | {_spread(rate, '.1f')} | "
            f"{statistics.median(rate) / chat_rate:.3f}x | "
            f"{_spread(per_round[route]['ttft_ms'], '.1f')} | "
            f"{'-' if route == 'chat' else _spread(paired, '+.2f')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="a profile id (default: the machine's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "runs" / "translation_cost")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = serve(args.profile, args.out / "inferd.log")
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        meta = httpx.get(url + "/v1/metadata", timeout=10).json()["models"][0]
        results = measure(url, args.rounds, args.requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    record = {
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "inferd": metadata.version("inferd"),
        "profile": meta["profile"]["id"],
        "engine": meta["engine"],
        "rounds": results,
    }
    (args.out / f"{meta['profile']['id']}.json").write_text(json.dumps(record, indent=1))
    print(f"profile {meta['profile']['id']} ({meta['engine']['name']}), {started}")
    print(table(results))


if __name__ == "__main__":
    main()
