"""The first user's first token: the first streamed request after a start, against later ones.

Readiness says the service can answer; the first request after it still pays for what was left
to do on first use (an import, a connection, the engine's own first run). Each trial starts a
fresh `inferd serve --profile P`, waits until it is ready and a second more, then sends
`--requests` streamed requests (`--route`: chat, or completions; a new prompt each, no
prompt-cache reuse, one token out) and times each one's first token. Sides, alternating trial
by trial:

- `inferd`: through the front of this source tree;
- `baseline` (with `--baseline-src`): through the front of another source tree, so a change
  to what the first request pays is measured beside what it changes;
- `engine`: straight to the engine's Unix socket of a fresh server of this tree (with its
  start's key, found as `serve_overhead.engine_of` does): the engine's own first-use cost.

Usage: python benchmarks/first_request.py [--profile llamacpp-cpu-q4_1] [--trials 8]
       [--requests 3] [--route chat|completions] [--baseline-src OTHER_CHECKOUT/src]
       [--cache-path DIR]
Prints a markdown table (first request, the later ones, in ms: median (min-max)).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine_profiles import median_spread
from serve_overhead import (
    MODEL,
    client,
    engine_of,
    environment,
    first_event_ms,
    first_token_ms,
    free_port,
    stop,
    wait_http,
)

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quiet",
    "table",
    "window",
    "music",
    "garden",
    "yellow",
    "paper",
    "summer",
    "bridge",
    "winter",
    "orange",
    "candle",
    "forest",
    "silver",
    "market",
    "pencil",
    "rocket",
    "island",
    "meadow",
]


def prompt() -> str:
    return " ".join(random.sample(WORDS, 12))


def first_chat_token_ms(side: httpx.Client, base_url: str, text: str) -> float:
    """`first_token_ms` for a chat: a user message, one token out, streamed."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
        "stream": True,
        "temperature": 0,
    }
    return first_event_ms(side, base_url + "/v1/chat/completions", body)


def trial(side: str, src: Path, args: argparse.Namespace, out: Path) -> list[float]:
    """One fresh server; the first tokens of its first `args.requests` requests, in ms."""
    env = {**os.environ, "PYTHONPATH": str(src), "INFERD_TUNE_IN_BACKGROUND": "false"}
    if args.cache_path:
        env["INFERD_CACHE_PATH"] = str(args.cache_path)
    port, log = free_port(), out / f"{side}-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "inferd", "serve", "--port", str(port), "--profile", args.profile]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/health/ready", proc, timeout=600)
        time.sleep(1.0)
        first = first_chat_token_ms if args.route == "chat" else first_token_ms
        if side == "engine":
            socket, key = engine_of(proc, log)
            with client(socket, key, keep_alive=False) as c:
                return [first(c, "http://engine", prompt()) for _ in range(args.requests)]
        with client(keep_alive=False) as c:
            base = f"http://127.0.0.1:{port}"
            return [first(c, base, prompt()) for _ in range(args.requests)]
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", default="llamacpp-cpu-q4_1")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--route", choices=("chat", "completions"), default="chat")
    parser.add_argument("--baseline-src", type=Path)
    parser.add_argument("--cache-path", type=Path)
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests must be at least 2 (the first, and a later one to compare)")
    args.out.mkdir(parents=True, exist_ok=True)
    sides = {"inferd": here.parent / "src"}
    if args.baseline_src:
        sides["baseline"] = args.baseline_src.resolve()
    sides["engine"] = here.parent / "src"
    got: dict[str, list[list[float]]] = {side: [] for side in sides}
    names = list(sides)
    for t in range(args.trials):
        for side in names[t % len(names) :] + names[: t % len(names)]:
            got[side].append(trial(side, sides[side], args, args.out))
            print(f"trial {t + 1} {side}: {[round(ms, 1) for ms in got[side][-1]]}", flush=True)
    lines = [
        f"First token of the first streamed request after a start, `{args.profile}`, "
        f"{args.route}, {args.trials} trials, ms",
        "",
        "| side | first request | later requests |",
        "|---|---|---|",
    ]
    for side, runs in got.items():
        first = [r[0] for r in runs]
        later = [ms for r in runs for ms in r[1:]]
        lines.append(f"| {side} | {median_spread(first)} | {median_spread(later)} |")
    print("\n".join(lines))
    (args.out / "first_request.md").write_text("\n".join(lines) + "\n")
    print(environment(), file=sys.stderr)


if __name__ == "__main__":
    main()
