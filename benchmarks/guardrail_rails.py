"""What each guardrail costs on this machine: the time a verdict takes, per rail, for a short
prompt and a long one, measured by the service itself (each verdict's `ms`) and end to end over
HTTP (`/v1/guardrails/check`, one rail per request, sequential, nothing else running).

The model-backed rails are timed with the models this repository can ship: the jailbreak
classifier on all-MiniLM-L6-v2 (vLLM, CPU) and SmolLM2-135M as the guard model of content safety
and topic control (llama.cpp). A real guard model (8B) costs what its engine takes for a
~700-token prompt and a ~20-token answer; that is the number to measure on the target machine.

Usage:
  inferd serve smollm2-135m-instruct all-minilm-l6-v2 --guardrails-config RAILS &
  python benchmarks/guardrail_rails.py --url http://127.0.0.1:8000 --rounds 3 --requests 20
(RAILS: the file below, written by `--write-config RAILS`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

CONFIG = """\
input:
  pii: {inline: false}
  jailbreak: {model: all-minilm-l6-v2, inline: false}
  content_safety: {model: smollm2-135m-instruct, inline: false}
  topic_control:
    model: smollm2-135m-instruct
    topics: "You are the assistant of a bakery. Only talk about bread and baking."
    inline: false
"""
SHORT = "How long should I knead bread dough before the first rise?"
LONG = (
    "I am planning a weekend of baking with my children and would like some advice. "
    "We have a basic oven, a stand mixer and plenty of flour. "
) * 14  # about 2,000 characters
RAILS = ("pii", "jailbreak", "content_safety", "topic_control")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--write-config", type=Path, help="write the service's rails file and exit")
    args = parser.parse_args()
    if args.write_config:
        args.write_config.write_text(CONFIG)
        return
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with httpx.Client(base_url=args.url, timeout=120) as client:
        for rail in RAILS:
            for name, text in (("short", SHORT), ("long", LONG)):
                body = {"text": text, "rails": [rail]}
                client.post("/v1/guardrails/check", json=body).raise_for_status()  # warm-up
                rounds: dict[str, list[float]] = {"rail_ms": [], "http_ms": []}
                for _ in range(args.rounds):
                    rail_ms, http_ms = [], []
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        r = client.post("/v1/guardrails/check", json=body)
                        http_ms.append((time.perf_counter() - started) * 1000)
                        r.raise_for_status()
                        rail_ms.append(r.json()["rails"][0]["ms"])
                    rounds["rail_ms"].append(statistics.median(rail_ms))
                    rounds["http_ms"].append(statistics.median(http_ms))
                results.setdefault(rail, {})[name] = rounds
                print(
                    f"{rail:15} {name:5} ({len(text):>4} chars): rail median of rounds "
                    + ", ".join(f"{v:.1f}" for v in rounds["rail_ms"])
                    + " ms; HTTP "
                    + ", ".join(f"{v:.1f}" for v in rounds["http_ms"])
                    + " ms",
                    flush=True,
                )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
