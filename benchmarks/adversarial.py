"""What the service holds under adversarial load (issue 16), against a real `inferd serve`.

Per engine profile and run, one fresh `inferd serve` (the default model, `--max-connections 64
--header-timeout-s 3`: limits low enough to hit in seconds), and in this order:

1. *stalled readers*: `--stalled` streamed chats (4,000 tokens, top-20 logprobs) whose clients
   read the first event and then nothing, held open until the end of the run;
2. *fuzzing*: schemathesis driven by OpenAI's published OpenAPI document (the pinned one), the
   operations inferd serves for a chat model, `--positive-examples` valid and `--examples`
   invalid requests per operation, each bounded as in tests/e2e/test_adversarial.py (whose
   helpers this uses), while
   `--slow` clients send a header byte every 0.5 s and never finish (each must be cut);
3. *huge headers*: `--huge` requests with a 1 MiB header block (each must get 431, fast);
4. *connection burst*: 100 connections held at once against the cap of 64 (beyond it: 503
   `too_many_connections`), each sending one request;
5. the stalled readers close; the admission slots must come back (running gauge 0), the service
   must be ready and answer a chat, with the same engine processes and no engine restart.

The front's resident memory (RSS) and that of the engine's process tree (the sum over its
processes; shared pages count once per process) are read before, sampled every 0.5 s for the
peak, and read after. Printed as a table, and written as JSON (`--out`).

Usage: python benchmarks/adversarial.py [--profile llamacpp-cpu-q4_1 --profile vllm-cpu-bf16]
       [--runs 2] [--positive-examples 30] [--examples 100] [--out benchmarks/runs/adversarial.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test helpers: one definition of the adversarial requests

from schemathesis.generation import GenerationMode  # noqa: E402
from tests.e2e.conftest import Served, start  # noqa: E402
from tests.e2e.test_adversarial import (  # noqa: E402
    HANG_S,
    STALLED_BODY,
    SlowHeaders,
    Tally,
    answers_a_chat,
    engine_processes,
    fuzz,
    metric,
    oversized_header_status,
    served_operations,
    stalled_stream,
)

MAX_CONNECTIONS = 64
HEADER_TIMEOUT_S = 3.0
BURST = 100


class Memory:
    """RSS of the front and of the engine's process tree: before, peak (sampled), after."""

    def __init__(self, served: Served) -> None:
        self.front = psutil.Process(served.proc.pid)
        self.before = self.read()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def read(self) -> dict[str, int]:
        engine = 0
        for proc in self.front.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                engine += proc.memory_info().rss
        return {"front": self.front.memory_info().rss, "engine": engine}

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(psutil.Error):
                now = self.read()
                self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def stop(self) -> dict[str, dict[str, int]]:
        self._stop.set()
        self._thread.join()
        return {"before": self.before, "peak": self.peak, "after": self.read()}


def raw_request(sock: socket.socket) -> int | str:
    """Send one GET on an open connection; its status, or `dropped` / `hung`."""
    try:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "dropped"
            data += chunk
    except TimeoutError:
        return "hung"
    except OSError:
        return "dropped"
    return int(data.split()[1])


def connection_burst(port: int) -> Counter[int | str]:
    socks: list[socket.socket] = []
    try:
        for _ in range(BURST):
            sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
            socks.append(sock)
        return Counter(raw_request(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def one_run(
    profile: str, examples: tuple[int, int], stalled: int, slow: int, huge: int, tmp: Path
) -> dict[str, Any]:
    served = start(
        tmp,
        "--profile",
        profile,
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--header-timeout-s",
        str(HEADER_TIMEOUT_S),
    )
    try:
        served.wait_ready()
        return attack(served, examples, stalled, slow, huge)
    finally:
        served.stop()


def attack(
    served: Served, examples: tuple[int, int], stalled: int, slow: int, huge: int
) -> dict[str, Any]:
    processes = engine_processes(served)
    restarts = metric(served.url, "inferd_engine_restarts")
    memory = Memory(served)
    result: dict[str, Any] = {}
    started = time.monotonic()
    phases: dict[str, float] = {}  # seconds each phase ended at, from the start

    def done(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 1)

    with contextlib.ExitStack() as stack:
        firsts = [stack.enter_context(stalled_stream(served, STALLED_BODY)) for _ in range(stalled)]
        result["stalled_streams_open"] = sum(f.startswith(b"HTTP/1.1 200") for f in firsts)
        done("stalled")
        slow_clients = [SlowHeaders(served.port, limit_s=60) for _ in range(slow)]
        tally = Tally()
        for operation in served_operations("chat"):
            for mode, count in zip(GenerationMode, examples, strict=True):
                fuzz(operation, mode, served.url + "/v1", tally, count)
        result["fuzz"] = {str(k): v for k, v in sorted(tally.statuses().items(), key=str)}
        result["fuzz_problems"] = tally.problems()[:20]
        result["fuzz_undrawn"] = tally.undrawn  # examples schemathesis could not draw
        result["fuzz_seconds_max"] = round(max(o.seconds for o in tally.outcomes), 2)
        result["fuzz_slowest"] = tally.slowest(5)
        done("fuzz")
        for client in slow_clients:
            client.thread.join(timeout=70)
        cuts = [c.cut_after for c in slow_clients]
        result["slow_headers"] = {
            "cut": sum(c is not None for c in cuts),
            "hung": sum(c is None for c in cuts),
            "cut_after_s_max": round(max((c for c in cuts if c is not None), default=0), 2),
        }
        done("slow")
        huge_started = time.monotonic()
        result["huge_headers"] = dict(
            Counter(str(oversized_header_status(served.port)) for _ in range(huge))
        )
        result["huge_headers_seconds"] = round(time.monotonic() - huge_started, 2)
        done("huge")
        result["burst"] = {str(k): v for k, v in connection_burst(served.port).items()}
        done("burst")
        result["running_while_stalled"] = metric(served.url, "num_requests_running")
    deadline = time.monotonic() + 30
    while (running := metric(served.url, "num_requests_running")) > 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    result["running_after_close"] = running
    done("released")
    result["phases"] = phases
    result["seconds"] = round(time.monotonic() - started, 1)
    result["ready_after"] = httpx.get(served.url + "/v1/health/ready", timeout=10).status_code
    result["answers_after"] = answers_a_chat(served.url)
    result["same_engine"] = engine_processes(served) == processes
    result["engine_restarts"] = metric(served.url, "inferd_engine_restarts") - restarts
    result["memory"] = memory.stop()
    return result


def summary(profile: str, run: int, r: dict[str, Any]) -> dict[str, Any]:
    """The table's row for one run."""
    fuzz = Counter({k: v for k, v in r["fuzz"].items()})
    sent_fuzz = sum(v for k, v in fuzz.items() if k != "unsendable")
    ok = sum(v for k, v in fuzz.items() if k.isdigit() and int(k) < 400)
    refused = {k: v for k, v in fuzz.items() if k.isdigit() and 400 <= int(k) < 500}
    errors = {k: v for k, v in fuzz.items() if k.isdigit() and int(k) >= 500}
    hung = fuzz.get("hung", 0) + r["slow_headers"]["hung"] + r["burst"].get("hung", 0)
    slow = r["slow_headers"]["cut"] + r["slow_headers"]["hung"]
    sent = sent_fuzz + r["stalled_streams_open"] + slow + sum(r["huge_headers"].values()) + BURST
    mib = {
        f"{who} {when}": round(r["memory"][when][who] / 2**20)
        for who in ("front", "engine")
        for when in ("before", "peak", "after")
    }
    return {
        "profile": profile,
        "run": run,
        "sent": sent,
        "fuzz sent": sent_fuzz,
        "fuzz 2xx": ok,
        "fuzz 4xx": refused,
        "fuzz 5xx": errors,
        "fuzz dropped": fuzz.get("dropped", 0),
        "huge headers": r["huge_headers"],
        "slow headers cut / hung": f"{r['slow_headers']['cut']} / {r['slow_headers']['hung']}",
        "burst": r["burst"],
        "hung": hung,
        **mib,
        "slots freed": r["running_after_close"] == 0,
        "same engine": r["same_engine"] and r["engine_restarts"] == 0,
        "seconds": r["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="append", help="engine profile (repeatable)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--positive-examples", type=int, default=30, help="valid requests per operation"
    )
    parser.add_argument("--examples", type=int, default=100, help="invalid requests per operation")
    parser.add_argument("--stalled", type=int, default=2, help="stalled stream readers")
    parser.add_argument("--slow", type=int, default=20, help="slow header senders")
    parser.add_argument("--huge", type=int, default=20, help="requests with 1 MiB headers")
    parser.add_argument("--cache-path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/runs/adversarial.json")
    args = parser.parse_args()
    if args.cache_path:
        os.environ["INFERD_TEST_CACHE_PATH"] = str(args.cache_path)
    profiles = args.profile or ["llamacpp-cpu-q4_1", "vllm-cpu-bf16"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.parent / "adversarial-logs"
    tmp.mkdir(exist_ok=True)
    rows, raw = [], []
    for run in range(1, args.runs + 1):
        for profile in profiles:  # engines alternate, run after run
            print(f"run {run}: {profile}", flush=True)
            examples = (args.positive_examples, args.examples)
            r = one_run(profile, examples, args.stalled, args.slow, args.huge, tmp)
            raw.append({"profile": profile, "run": run, **r})
            rows.append(summary(profile, run, r))
            print(json.dumps(rows[-1]), flush=True)
            args.out.write_text(json.dumps({"rows": rows, "raw": raw}, indent=2))
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


if __name__ == "__main__":
    main()
