"""What each guardrail costs per check on this CPU: the PII rail over texts of growing length.

Texts are real prose (standard-library docstrings) with personal data of every kind mixed in,
so validators run as well as patterns. Median and p99 of 200 checks per length, one thread.

Usage: python benchmarks/guardrail_latency.py
"""

from __future__ import annotations

import importlib
import statistics
import time

from inferd.guardrails import pii

PII = (
    " Contact jane.doe@example.com or +1 415-555-2671, card 4111 1111 1111 1111,"
    " IBAN GB82 WEST 1234 5698 7654 32, host 192.168.1.20, SSN 123-45-6789."
)


def prose(chars: int) -> str:
    text = ""
    for name in ("argparse", "json", "subprocess", "socket", "re", "configparser"):
        text += PII + " " + " ".join((importlib.import_module(name).__doc__ or "").split())
    while len(text) < chars:
        text += text
    return text[:chars]


def main() -> None:
    print("| text chars | findings | median ms | p99 ms |\n|---|---|---|---|")
    for chars in (100, 1_000, 4_000, 16_000):
        text = prose(chars)
        times = []
        for _ in range(200):
            started = time.perf_counter()
            found = pii.find(text)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p99 = times[int(len(times) * 0.99) - 1]
        print(f"| {chars:,} | {len(found)} | {statistics.median(times):.3f} | {p99:.3f} |")


if __name__ == "__main__":
    main()
