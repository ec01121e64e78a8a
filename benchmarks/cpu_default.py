"""The CPU default against each single-engine setup, side by side (issue 18's benchmarks).

Setups (`--setups`, each started afresh in every round; rounds rotate their order so drift on a
shared machine hits all alike):

- `default`: `inferd serve` with no flags (the combined llama.cpp + vLLM profile once it is the
  default: `--profile cpu-both`; until then whatever the catalog picks);
- `both`: `inferd serve --profile cpu-both`, measured as the default is (warm-up, step load);
- `q4_1`, `q8_0`, `vllm`: `inferd serve --profile llamacpp-cpu-q4_1 | llamacpp-cpu-q8_0 |
  vllm-cpu-bf16`;
- `vllm-plain`: vLLM's own server on the same weights, started as engine_profiles.py does.

Per setup and round, in this order:
1. ready time: process start to `/v1/health/ready` (vLLM alone: `/health`) answering 200, with
   the cache as earlier rounds left it (warm from the second round on: run `--rounds` >= 2, or
   a `--quick` round first, and read the later rounds);
2. default only, the warm-up: if some engine is not ready yet when the service is (vLLM
   compiling behind llama.cpp), one user's rate right away ("during"), then, once every engine
   is ready, the same load again ("steady"); the engine states at each end are recorded, so a
   "during" run that outlived the warm-up shows as such;
3. vLLM's serving benchmark (inferd.bench.runner: 128 in / 128 out unless `--input-len` /
   `--output-len` say otherwise, ignore_eos) at each `--concurrency`; 503s count as `failed` in
   its result; each level draws its own prompts (a seed per level) so no engine answers from a
   prompt cached by an earlier level; `--prompts` per level, by default `level_prompts`: eight
   waves of `c` (a level's first wave pays the change of engine once, which a short level
   weighs more than a user's steady load does); with several engines behind the model, how many
   requests each took (`inferd_engine_requests_total`, the load generator's warm-up request
   included);
4. default only, the step load: 1 user for `--step-seconds`, then 16, then 1, run back to back by
   one load-generator process (this script's `--phases` mode: vLLM's benchmark imported once, so
   no start-up gap between phases); prompts per phase from the rates measured in step 3, so a
   phase served slower than that runs longer (each phase's duration is reported);
5. memory: RSS of each engine's process tree (and of the front) before the setup is stopped.

Writes every result to `--out`/cpu_default.json and prints markdown tables (median over rounds,
min-max beside it) ready for benchmarks/RESULTS.md, with the machine and versions, and the
default (or `both`) against every other setup, level by level and round by round (the targets'
ratios). `--summary-of RUN/cpu_default.json` prints those tables again for a finished run.

inferd's background tuning (`--tune-in-background`, on by default) may start llama.cpp profiles
of its own between measurements; `--no-background-tuning` turns it off for every inferd setup.

Usage: python benchmarks/cpu_default.py [--rounds 3] [--setups default,q4_1,q8_0,vllm,vllm-plain]
       [--concurrency 1,4,8,16] [--step-seconds 30] [--no-background-tuning] [--quick] [--out DIR]
A round of `both,q4_1,vllm` at 1,4,8,16 users with 20 s step phases takes about 11 minutes on a
2-core Xeon with AMX (two vLLM starts of about 36 s, vLLM alone's 16 requests at one user 84 s);
each further setup adds about 3-6 minutes (a cold vLLM compile: 1-2 minutes more).
Smoke: python benchmarks/cpu_default.py --quick --rounds 1 --setups q8_0 --concurrency 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from engine_profiles import environment
from inferd.bench.runner import KEPT, BenchSpec, _argv, run_level
from inferd.cache import prepare
from inferd.cli.plan import resolve
from inferd.config import load_settings
from inferd.errors import InferdError
from serve_overhead import MODEL, free_port, stop, wait_http

HERE = Path(__file__).resolve().parent
INFERD = str(Path(sys.executable).with_name("inferd"))
PROFILES = ("llamacpp-cpu-q4_1", "llamacpp-cpu-q8_0", "vllm-cpu-bf16")
STEP_USERS = (1, 16, 1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Setup:
    """How to start one setup on a port, and what to ask it."""

    name: str
    argv: Callable[[int], list[str]]
    health: str  # the path answering 200 once it takes requests
    served: str  # the model name requests carry
    inferd: bool = True
    default: bool = False  # the setup whose warm-up and step load are measured


def setups(vllm_dir: Path) -> dict[str, Setup]:
    def serve(*flags: str) -> Callable[[int], list[str]]:
        return lambda port: [INFERD, "serve", "--port", str(port), *flags]

    def plain(port: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_dir)),
            *("--port", str(port), "--gpu-memory-utilization", "0.3"),
        ]

    ready = "/v1/health/ready"
    return {
        "default": Setup("default", serve(), ready, MODEL, default=True),
        # The combined profile by name, measured like the default (warm-up, step load): the
        # same as `default` where the catalog makes it the default and this machine runs it.
        "both": Setup("both", serve("--profile", "cpu-both"), ready, MODEL, default=True),
        "q4_1": Setup("q4_1", serve("--profile", PROFILES[0]), ready, MODEL),
        "q8_0": Setup("q8_0", serve("--profile", PROFILES[1]), ready, MODEL),
        "vllm": Setup("vllm", serve("--profile", PROFILES[2]), ready, MODEL),
        "vllm-plain": Setup("vllm-plain", plain, "/health", str(vllm_dir), inferd=False),
    }


# ---------------------------------------------------------------------- what a setup reports


def engine_states(url: str) -> list[dict[str, Any]]:
    """Every engine `/v1/health/ready` describes (any object with `engine` and `state`, however
    the models nest them), so a combined profile's two engines are both seen."""

    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            # A model of two engines also sums them up at its own level: its `engines` count.
            if "engine" in node and "state" in node and "engines" not in node:
                yield {"engine": node["engine"], "state": node["state"]}
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    with contextlib.suppress(httpx.HTTPError, ValueError):
        return list(walk(httpx.get(url + "/v1/health/ready", timeout=5).json()))
    return []


def selected_profile(url: str) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        chosen = httpx.get(url + "/v1/metadata", timeout=5).json().get("selectedModelProfileId")
        return str(chosen) if chosen else None
    return None


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def engine_trees(front: psutil.Process) -> Iterator[tuple[str, psutil.Process]]:
    """Each engine process under an inferd front, by what it runs (`llamacpp`, `vllm`, or
    `other`)."""
    for child in front.children():
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(child.cmdline())
            yield (
                "llamacpp" if "llama-server" in cmd else "vllm" if "vllm" in cmd else "other",
                child,
            )


def memory(pid: int, inferd: bool) -> dict[str, list[float]]:
    """RSS (MiB) of each engine's process tree, by what it runs, and of the front. RSS counts
    shared pages in every process: an upper bound for vLLM's several processes. More than one
    llama.cpp tree: the front's background tuning was measuring another profile just then."""
    root = psutil.Process(pid)
    if not inferd:
        return {"vllm": [tree_rss_mb(root)]}
    out = {"front": [round(root.memory_info().rss / 2**20, 1)]}
    for kind, child in engine_trees(root):
        out.setdefault(kind, []).append(tree_rss_mb(child))
    return out


# ---------------------------------------------------------------------- load


@dataclass(frozen=True)
class Lengths:
    """Each request's prompt and output tokens (`--input-len`, `--output-len`)."""

    prompt: int = 128
    output: int = 128


def spec(
    url: str, setup: Setup, tokenizer: Path, prompts: int, seed: int, lengths: Lengths
) -> BenchSpec:
    return BenchSpec(
        url=url,
        model=setup.served,
        tokenizer=str(tokenizer),
        input_len=lengths.prompt,
        output_len=lengths.output,
        prompts_per_level=prompts,
        seed=seed,
        label=setup.name,
    )


def engine_requests(url: str) -> dict[str, float]:
    """inferd's requests per engine so far (`inferd_engine_requests_total`); {} elsewhere."""
    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(url + "/v1/metrics", timeout=5).text
        return {
            engine: float(value)
            for engine, value in re.findall(
                r'^inferd_engine_requests_total\{[^}]*engine="([^"]+)"[^}]*\} (\S+)$', text, re.M
            )
        }
    return {}


def level_prompts(concurrency: int) -> int:
    """Requests per level unless `--prompts` says: eight waves of `concurrency` users, at least
    16. At sixteen users, cpu-both's first request of a level goes to llama.cpp as one user's and
    is recalled once the crowd shows, which vLLM then waits for: measured on a 2-core Xeon with
    AMX, with 48 requests (three waves) cpu-both was 0.95x vLLM alone (rounds 0.93-1.04), with
    128 (eight) 1.02x (rounds 0.98-1.04), vLLM's own step the same (44.2 against 44.8 ms)."""
    return max(16, 8 * concurrency)


def level(
    url: str, setup: Setup, tokenizer: Path, c: int, prompts: int, seed: int, lengths: Lengths
) -> dict[str, Any]:
    began = time.monotonic()
    before = engine_requests(url) if setup.inferd else {}
    try:
        result = run_level(spec(url, setup, tokenizer, prompts, seed, lengths), {"concurrency": c})
    except InferdError as exc:  # recorded, and the run goes on with the next measurement
        log(f"  {setup.name} c={c}: {exc}")
        return {"concurrency": c, "error": str(exc)}
    after = engine_requests(url) if setup.inferd else {}
    if len(after) > 1:  # which engine took the level's requests (the generator's warm-up too)
        result["engine_requests"] = {e: n - before.get(e, 0.0) for e, n in after.items()}
    log(
        f"  {setup.name} c={c}: {result.get('output_throughput', 0):.1f} tok/s, TTFT p50 "
        f"{result.get('median_ttft_ms', 0):.0f} ms, failed {result.get('failed')}, engines "
        f"{result.get('engine_requests', '-')} ({time.monotonic() - began:.0f} s)"
    )
    return result


def warmup(
    url: str,
    setup: Setup,
    tokenizer: Path,
    prompts: int,
    seed: int,
    timeout: float,
    lengths: Lengths,
) -> dict[str, Any]:
    """One user's rate while some engine is still starting, then once all are ready."""
    before = engine_states(url)
    out: dict[str, Any] = {"states_at_ready": before}
    if all(e["state"] == "ready" for e in before):
        out["note"] = "every engine ready with the service: nothing warming"
        return out
    out["during"] = level(url, setup, tokenizer, 1, prompts, seed, lengths)
    out["states_after_during"] = engine_states(url)
    deadline = time.monotonic() + timeout
    while not all(e["state"] == "ready" for e in engine_states(url)):
        if time.monotonic() > deadline:
            out["note"] = f"not every engine ready {timeout:g} s after the service"
            return out
        time.sleep(1)
    # Prompts of their own: the "during" ones are in the engines' prompt caches by now.
    out["steady"] = level(url, setup, tokenizer, 1, prompts, seed + 1, lengths)
    return out


def step_load(
    url: str,
    setup: Setup,
    tokenizer: Path,
    seconds: float,
    rates: dict[int, float],
    seed: int,
    lengths: Lengths,
) -> list[dict[str, Any]]:
    """1 user, 16, then 1, back to back in one load-generator process (`--phases`)."""
    argvs = []
    for i, users in enumerate(STEP_USERS):
        rate = rates.get(users) or (60.0 if users == 1 else 200.0)  # tok/s, if not measured
        prompts = max(users, math.ceil(seconds * rate / lengths.output))
        the_spec = spec(url, setup, tokenizer, prompts, seed + i, lengths)
        argv = _argv(the_spec, {"concurrency": users})
        argv = argv[argv.index("--backend") :]  # the load generator's own arguments
        argv[argv.index("--num-warmups") + 1] = "1" if i == 0 else "0"  # no gap between phases
        argvs.append(argv)
    done = subprocess.run(
        [sys.executable, __file__, "--phases", json.dumps(argvs)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("["):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        log(f"  step load failed: {tail}")  # recorded; the run goes on
        return [{"error": tail} for _ in STEP_USERS]
    phases: list[dict[str, Any]] = json.loads(lines[-1])
    for users, phase in zip(STEP_USERS, phases, strict=True):
        log(
            f"  step {users} user(s): {phase.get('output_throughput', 0):.1f} tok/s, TTFT p50 "
            f"{phase.get('median_ttft_ms', 0):.0f} ms, failed {phase.get('failed')}, "
            f"{phase.get('duration', 0):.0f} s"
        )
    return phases


def run_generator(argv: list[str]) -> dict[str, Any]:
    """vLLM's serving benchmark in this process (imported once, so no start-up gap between
    runs) with the load generator's own arguments: the figures inferd keeps (`KEPT`)."""
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(argv))
    return {k: result[k] for k in KEPT if k in result}


def run_phases(argvs: list[list[str]]) -> None:
    """`--phases`: vLLM's benchmark for each argument list in turn, one process; one JSON line."""
    print(json.dumps([run_generator(argv) for argv in argvs]))


# ---------------------------------------------------------------------- one setup, one round


def run_setup(
    setup: Setup, rnd: int, args: argparse.Namespace, tokenizer: Path, env: dict[str, str]
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"round {rnd}: starting {setup.name}")
    logfile = (args.out / f"{setup.name}-{rnd}.log").open("wb")
    began = time.monotonic()
    proc = subprocess.Popen(
        setup.argv(port), env=env, start_new_session=True, stdout=logfile, stderr=subprocess.STDOUT
    )
    row: dict[str, Any] = {"setup": setup.name, "round": rnd}
    lengths = Lengths(args.input_len, args.output_len)
    try:
        wait_http(url + setup.health, proc, timeout=args.ready_timeout)
        row["ready_s"] = round(time.monotonic() - began, 2)
        row["load_1m"] = os.getloadavg()[0]
        log(f"  {setup.name} ready in {row['ready_s']} s (load {row['load_1m']:.2f})")
        if setup.inferd:
            row["profile"] = selected_profile(url)
        seed = 1000 * rnd
        if setup.default:
            row["warmup"] = warmup(
                url, setup, tokenizer, args.warm_prompts, seed + 900, args.ready_timeout, lengths
            )
            engines = engine_states(url)
            row["engines"] = engines
        row["levels"] = {}
        for c in args.levels:
            prompts = args.prompts or level_prompts(c)
            row["levels"][c] = level(url, setup, tokenizer, c, prompts, seed + c, lengths)
        if setup.default and args.step_seconds > 0:
            rates = {c: r.get("output_throughput") or 0.0 for c, r in row["levels"].items()}
            row["step"] = step_load(
                url, setup, tokenizer, args.step_seconds, rates, seed + 500, lengths
            )
        row["rss_mb"] = memory(proc.pid, setup.inferd)
        log(f"  {setup.name} memory (RSS MiB): {row['rss_mb']}")
    finally:
        stop(proc)
        logfile.close()
    return row


# ---------------------------------------------------------------------- tables


def _stats(values: list[Any], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _shares(levels: list[dict[str, Any]]) -> str:
    """Requests per engine, summed over rounds (inferd's own count; "-" for plain vLLM)."""
    total: dict[str, float] = {}
    for got in levels:
        for engine, n in (got.get("engine_requests") or {}).items():
            total[engine] = total.get(engine, 0.0) + n
    return ", ".join(f"{e} {n:g}" for e, n in total.items()) or "-"


def _median(rounds: dict[int, dict[str, Any]], key: str) -> float:
    """The median of `key` over one setup's rounds of one level."""
    return float(statistics.median(level[key] for level in rounds.values()))


def against(rows: list[dict[str, Any]], levels: list[int]) -> list[str]:
    """The measured setup (the default, or `both` by name) against every other setup, level by
    level: the ratio of the medians' output rates, the same ratio round by round (each round
    starts every setup afresh, side by side), and the first token's difference. The rounds of
    one setup vary by 5-10% on a shared 2-core VM, so a ratio near 1.0 is read round by round,
    not from the medians alone."""
    names = list(dict.fromkeys(r["setup"] for r in rows))
    mine = next((n for n in names if n in ("default", "both")), None)
    if mine is None or len(names) < 2:
        return []
    got: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in rows:
        for c, level in (r.get("levels") or {}).items():
            if level.get("output_throughput"):
                got.setdefault((r["setup"], int(c)), {})[r["round"]] = level
    out = [
        "",
        f"| {mine} against | concurrency | output tok/s, ratio of medians | round by round "
        "| TTFT p50 ms, difference of medians |",
        "|---|---|---|---|---|",
    ]
    for c in levels:
        ours = got.get((mine, c), {})
        for other in (n for n in names if n != mine):
            theirs = got.get((other, c), {})
            if not ours or not theirs:
                continue
            rate = _median(ours, "output_throughput") / _median(theirs, "output_throughput")
            rounds = ", ".join(
                f"{ours[i]['output_throughput'] / theirs[i]['output_throughput']:.2f}"
                for i in sorted(ours.keys() & theirs.keys())
            )
            ttft = _median(ours, "median_ttft_ms") - _median(theirs, "median_ttft_ms")
            out.append(f"| {other} | {c} | {rate:.2f}x | {rounds} | {ttft:+.0f} |")
    return out


def summarize(rows: list[dict[str, Any]], levels: list[int]) -> str:
    names = list(dict.fromkeys(r["setup"] for r in rows))
    by = {n: [r for r in rows if r["setup"] == n and "levels" in r] for n in names}
    out = [
        "Median over rounds, (min-max) beside it; `failed` summed over rounds.",
        "",
        "| setup | profile | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms | failed "
        "| requests per engine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for n in names:
            got = [r["levels"][c] for r in by[n] if c in r["levels"]]
            if not got:
                continue
            profile = next((r.get("profile") for r in by[n] if r.get("profile")), "-")
            out.append(
                f"| {n} | {profile} | {c} | {_stats([g.get('output_throughput') for g in got])} | "
                f"{_stats([g.get('median_ttft_ms') for g in got], '{:.0f}')} | "
                f"{_stats([g.get('median_itl_ms') for g in got])} | "
                f"{sum(int(g.get('failed') or 0) for g in got)} | {_shares(got)} |"
            )
    out += against(rows, levels)
    out += ["", "| setup | ready s | RSS MiB per engine tree (median) |", "|---|---|---|"]
    for n in names:
        rss: dict[str, list[float]] = {}
        trees: dict[str, int] = {}
        for r in by[n]:
            for k, v in (r.get("rss_mb") or {}).items():
                rss.setdefault(k, []).append(sum(v))
                trees[k] = max(trees.get(k, 0), len(v))
        shown = ", ".join(
            f"{k} {statistics.median(v):.0f}" + (f" ({trees[k]} trees)" if trees[k] > 1 else "")
            for k, v in rss.items()
        )
        out.append(
            f"| {n} | {_stats([r.get('ready_s') for r in by[n]], '{:.2f}')} | {shown or '-'} |"
        )
    default = [r for r in rows if "warmup" in r or "step" in r]
    if any("during" in r.get("warmup", {}) for r in default):
        out += [
            "",
            "| default, one user | output tok/s | TTFT p50 ms | engines when it ended |",
            "|---|---|---|---|",
        ]
        for part, label in (("during", "during"), ("steady", "after")):
            got = [r["warmup"][part] for r in default if part in r.get("warmup", {})]
            states = [r["warmup"].get("states_after_during") for r in default]
            shown = "; ".join(
                ", ".join(f"{e['engine']} {e['state']}" for e in s or []) for s in states
            )
            out.append(
                f"| {label} vLLM's warm-up | {_stats([g.get('output_throughput') for g in got])} | "
                f"{_stats([g.get('median_ttft_ms') for g in got], '{:.0f}')} | "
                f"{shown if part == 'during' else 'all ready'} |"
            )
    elif default:
        notes = {r.get("warmup", {}).get("note") for r in default} - {None}
        out += ["", f"default warm-up: {'; '.join(sorted(notes)) or 'not measured'}"]
    steps = [r["step"] for r in default if "step" in r]
    if steps:
        out += [
            "",
            "| step load (default) | users | output tok/s | TTFT p50 ms | failed | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for i, users in enumerate(STEP_USERS):
            got = [s[i] for s in steps]
            out.append(
                f"| phase {i + 1} | {users} | {_stats([g.get('output_throughput') for g in got])} "
                f"| {_stats([g.get('median_ttft_ms') for g in got], '{:.0f}')} | "
                f"{sum(int(g.get('failed') or 0) for g in got)} | "
                f"{_stats([g.get('duration') for g in got], '{:.0f}')} |"
            )
    loads = [r["load_1m"] for r in rows if "load_1m" in r]
    if loads:
        out += ["", f"load average (1 min) at each ready: {_stats(loads, '{:.2f}')}"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- main


def add_serving_args(parser: argparse.ArgumentParser, run_name: str) -> None:
    """The options every benchmark of the CPU setups shares (this one, `cpu_paired.py`)."""
    parser.add_argument(
        "--no-background-tuning",
        action="store_true",
        help="start inferd with --no-tune-in-background (its measurements then never overlap "
        "the benchmark's load; by default inferd runs as a user gets it)",
    )
    parser.add_argument(
        "--cache-path",
        type=Path,
        default=Path(os.environ.get("INFERD_CACHE_PATH", Path.home() / ".cache" / "inferd")),
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "runs" / time.strftime(f"{run_name}-%Y%m%d-%H%M%S")
    )


def serving_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment every setup starts in: the benchmark's cache, tuning as asked."""
    env = {**os.environ, "INFERD_CACHE_PATH": str(args.cache_path)}
    if args.no_background_tuning:
        env["INFERD_TUNE_IN_BACKGROUND"] = "false"
    return env


def vllm_weights(cache_path: Path) -> Path:
    """The safetensors folder in the cache (prepared if missing): the tokenizer of every setup,
    and vLLM plain's weights."""
    settings = load_settings({"model": MODEL, "cache_path": cache_path, "profile": PROFILES[2]})
    plan = resolve(settings)
    plan.store.ensure_writable()
    prepared = prepare(
        plan.entry, plan.chosen.profile, plan.store, index_url=settings.pypi_index_url
    )
    return prepared.path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", default="default,q4_1,q8_0,vllm,vllm-plain")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--prompts", type=int, default=0, help="per level (default 8 x c, >= 16)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--warm-prompts", type=int, default=8, help="per warm-up measurement")
    parser.add_argument("--step-seconds", type=float, default=30, help="per step phase; 0: none")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="4 prompts a level, 10 s phases")
    add_serving_args(parser, "cpu")
    parser.add_argument(
        "--summary-of",
        type=Path,
        help="print the tables of a finished run (its cpu_default.json) and run nothing",
    )
    parser.add_argument("--phases", help=argparse.SUPPRESS)  # internal: the step load's runner
    args = parser.parse_args()
    if args.phases is None:
        try:
            args.levels = [int(c) for c in args.concurrency.split(",")]
        except ValueError:
            parser.exit(2, f"--concurrency {args.concurrency!r}: expected numbers like 1,4,8,16\n")
        if args.quick:
            args.prompts = args.prompts or 4
            args.warm_prompts = min(args.warm_prompts, 2)
            args.step_seconds = min(args.step_seconds, 10)
    return args


def main() -> None:
    # A stopped benchmark still stops the setup it started (the `finally` of run_setup).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    if args.phases is not None:
        run_phases(json.loads(args.phases))
        return
    if args.summary_of is not None:
        try:
            saved = json.loads(args.summary_of.read_text())
            done: list[dict[str, Any]] = saved["rows"]
            for r in done:  # JSON made the levels' concurrency keys strings
                r["levels"] = {int(c): v for c, v in (r.get("levels") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(
                f"--summary-of {args.summary_of}: not a cpu_default.json ({exc})", file=sys.stderr
            )
            sys.exit(2)
        levels = sorted({c for r in done for c in r["levels"]})
        print(summarize(done, levels) + f"\n{saved.get('machine', '')}")
        return
    vllm_dir = vllm_weights(args.cache_path)
    table = setups(vllm_dir)
    names = args.setups.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"--setups: unknown {', '.join(unknown)} (known: {', '.join(table)})")
    args.out.mkdir(parents=True, exist_ok=True)
    env = serving_env(args)
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            rows.append(run_setup(table[name], rnd, args, vllm_dir, env))
            (args.out / "cpu_default.json").write_text(
                json.dumps({"machine": environment(), "rows": rows}, indent=1)
            )
        log(f"round {rnd} done, {time.monotonic() - began:.0f} s so far")
    summary = summarize(rows, args.levels)
    summary += f"\n{environment()}\n"
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
