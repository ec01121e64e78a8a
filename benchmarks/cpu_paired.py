"""`cpu-both` against one engine alone in paired blocks: parity on a machine that drifts.

`cpu_default.py` runs each setup after the other. On a shared 2-core VM the machine's own speed
moves by 5-20% between setups run minutes apart (measured on a 2-core Xeon with AMX: one user's
round-by-round ratio, cpu-both against llamacpp-cpu-q4_1 alone, had a standard deviation of 9%
over seven rounds), so a difference of a percent or two, which is all that can separate two
setups serving a load with the same engine, is lost in it. Here the two setups run at once,
each started afresh, and each level's load alternates between them in blocks of a few waves, in
ABBA order (a steady drift cancels within each pair of pairs), sent by one load-generator
process with no gap between blocks (vLLM's serving benchmark, imported once, as
`cpu_default.py --phases` does). Each pair of adjacent blocks gives one ratio of output rates;
the summary is their mean with a one-sided 95% lower bound (Student's t), and the paired
differences of the blocks' median first token.

The setup not under load idles. vLLM alone is stopped (SIGSTOP to the front and every process
under it) while it is not measured and continued a moment before its block: idle, vLLM's
processes wake a few times a second and would slow the other setup, while cpu-both stops its
own idle vLLM (`Supervisor.rest`). llama.cpp idles without waking. Memory: both setups at once
(about 6 GB and 5 GB for cpu-both against vLLM alone) must fit.

Each level's blocks are `--waves` waves of its users (`waves x c` requests, at least 8), with a
block of `c` requests on each setup first that is not counted (the generator's warm-up and a
burst's first change of engine on cpu-both, once). Prompts are drawn afresh for every block.

Each block also records where the machine's CPU went while it ran (`cpu` in the JSON, seconds):
the measured setup's front and engines, the other setup, the load generator (this process), the
rest of the machine and the hypervisor's steal. A block in which the other setup, the rest and
steal together used more than `--void-interference` of a core on average (0.15 by default)
measured something besides the setups: its pair is void, reported and left out of the ratios. A
slow block with nothing else running is not void: it counts against whichever setup was slow.
(Written after one cpu-both block at sixteen users ran at half speed for its whole length, the
cause never seen for want of this record.)

Usage: python benchmarks/cpu_paired.py [--pairs 8] [--levels 1:q4_1,4:q4_1,8:q4_1,16:vllm]
       [--waves 4] [--no-background-tuning] [--cache-path DIR] [--out DIR]
On the 2-core Xeon: about 30 minutes for 8 pairs at the four default levels (vLLM alone's start
of about a minute, cpu-both's of 2 s with vLLM behind it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cpu_default import (
    Lengths,
    Setup,
    add_serving_args,
    engine_states,
    engine_trees,
    log,
    memory,
    run_generator,
    serving_env,
    setups,
    spec,
    vllm_weights,
)
from engine_profiles import environment
from inferd.bench.runner import _argv
from serve_overhead import free_port, stop, wait_http

# One-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: 1.645); a
# table, as scipy is no dependency of inferd's (only of some engines').
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860}
T95 |= {9: 1.833, 10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753}
T95 |= {16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729, 20: 1.725, 25: 1.708, 30: 1.697}


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of an inferd setup's processes: its front, and each engine's
    tree below it by what it runs (`cpu_default.engine_trees`)."""
    out: dict[str, float] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        out["front"] = sum(root.cpu_times()[:2])
        for kind, child in engine_trees(root):
            for p in (child, *child.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    out[kind] = out.get(kind, 0.0) + sum(p.cpu_times()[:2])
    return out


@dataclass(frozen=True)
class CpuMark:
    """The machine's and each setup's CPU counters at one moment."""

    at: float
    busy: float  # every CPU's non-idle seconds, steal left out
    steal: float
    generator: float
    trees: dict[str, dict[str, float]]

    @classmethod
    def take(cls, running: list[Running]) -> CpuMark:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - t.iowait - t.steal - t.guest - t.guest_nice  # guest is in user
        return cls(
            time.monotonic(),
            busy,
            t.steal,
            sum(psutil.Process().cpu_times()[:2]),
            {r.setup.name: tree_cpu(r.proc.pid) for r in running},
        )

    def since(self, start: CpuMark, measured: str) -> dict[str, Any]:
        """Seconds of CPU from `start` to this mark: the measured setup's by part, the other
        setups', the generator's, the rest of the machine's, steal, and the interference (other
        + rest + steal, in cores on average)."""
        wall = self.at - start.at
        parts = {
            name: {k: v - start.trees[name].get(k, 0.0) for k, v in tree.items()}
            for name, tree in self.trees.items()
        }
        mine = parts.pop(measured)
        other = sum(sum(p.values()) for p in parts.values())
        generator = self.generator - start.generator
        steal = self.steal - start.steal
        rest = self.busy - start.busy - sum(mine.values()) - other - generator
        return {
            "wall_s": round(wall, 2),
            "measured": {k: round(v, 2) for k, v in mine.items()},
            "other": round(other, 2),
            "generator": round(generator, 2),
            "rest": round(rest, 2),
            "steal": round(steal, 2),
            "interference": round((other + max(rest, 0.0) + steal) / wall, 3) if wall else 0.0,
        }


@dataclass
class Running:
    """One setup's server for the whole run."""

    setup: Setup
    proc: subprocess.Popen[bytes]
    url: str
    ready_s: float
    stoppable: bool  # vLLM alone: stopped while the other setup is measured
    stopped: bool = False

    def signal_tree(self, sig: signal.Signals) -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for p in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)

    def pause(self) -> None:
        if self.stoppable and not self.stopped:
            self.signal_tree(signal.SIGSTOP)
            self.stopped = True

    def resume(self, settle_s: float) -> None:
        if self.stopped:
            self.signal_tree(signal.SIGCONT)
            self.stopped = False
            time.sleep(settle_s)


def start(setup: Setup, out: Path, env: dict[str, str], timeout: float) -> Running:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"starting {setup.name}")
    logfile = (out / f"{setup.name}.log").open("wb")
    began = time.monotonic()
    proc = subprocess.Popen(
        setup.argv(port), env=env, start_new_session=True, stdout=logfile, stderr=subprocess.STDOUT
    )
    logfile.close()  # the child holds its own descriptor
    running = Running(setup, proc, url, 0.0, stoppable=setup.name == "vllm")
    try:
        wait_http(url + setup.health, proc, timeout=timeout)
        running.ready_s = round(time.monotonic() - began, 2)
        deadline = time.monotonic() + timeout  # every engine behind the model, not only the first
        while not all(e["state"] == "ready" for e in engine_states(url)):
            if time.monotonic() > deadline:
                raise SystemExit(f"{setup.name}: not every engine ready after {timeout:g} s")
            time.sleep(1)
    except BaseException:
        stop(proc)
        raise
    every = time.monotonic() - began
    log(f"  {setup.name} ready in {running.ready_s} s, every engine in {every:.0f} s")
    return running


def block_argv(
    target: Running, tokenizer: Path, users: int, prompts: int, seed: int, warmups: int
) -> list[str]:
    the_spec = spec(target.url, target.setup, tokenizer, prompts, seed, Lengths())
    argv = _argv(the_spec, {"concurrency": users})
    argv = argv[argv.index("--backend") :]  # the load generator's own arguments
    argv[argv.index("--num-warmups") + 1] = str(warmups)
    return argv


def run_block(argv: list[str]) -> dict[str, Any]:
    with contextlib.redirect_stdout(sys.stderr):  # its tables go to the log, not our JSON
        return run_generator(argv)


def mean_low(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and its one-sided 95% lower bound."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    df = len(values) - 1
    t = T95.get(df) or next((T95[d] for d in sorted(T95) if d >= df), 1.645)
    return mean, mean - t * statistics.stdev(values) / math.sqrt(len(values))


def level(
    ours: Running,
    theirs: Running,
    tokenizer: Path,
    users: int,
    pairs: int,
    waves: int,
    seed: int,
    void_above: float,
) -> dict[str, Any]:
    """One level: a block on each setup not counted, then `pairs` pairs of blocks, ABBA; the
    ratios and first-token differences over the pairs not void (`void_above`)."""
    prompts = max(8, waves * users)
    blocks: list[dict[str, Any]] = []

    def on(target: Running, n: int, the_seed: int, warmups: int) -> dict[str, Any]:
        for other in (ours, theirs):
            if other is not target:
                other.pause()
        target.resume(settle_s=2.0)
        began = CpuMark.take([ours, theirs])
        got = run_block(block_argv(target, tokenizer, users, n, the_seed, warmups))
        got["cpu"] = CpuMark.take([ours, theirs]).since(began, target.setup.name)
        got["setup"] = target.setup.name
        log(
            f"  c={users} {target.setup.name}: {got.get('output_throughput', 0):.1f} tok/s, "
            f"TTFT p50 {got.get('median_ttft_ms', 0):.0f} ms, failed {got.get('failed')}, "
            f"interference {got['cpu']['interference']:.3f} cores"
        )
        return got

    for i, target in enumerate((ours, theirs)):
        on(target, users, seed + 90 + i, warmups=1)
    for i in range(pairs):
        order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        got: dict[str, Any] = {
            t.setup.name: on(t, prompts, seed + 2 * i + j, 0) for j, t in enumerate(order)
        }
        got["first"] = order[0].setup.name
        got["void"] = any(got[t.setup.name]["cpu"]["interference"] > void_above for t in order)
        blocks.append(got)
    a, b = ours.setup.name, theirs.setup.name
    valid = [p for p in blocks if not p["void"]]
    ratios = [p[a]["output_throughput"] / p[b]["output_throughput"] for p in valid]
    ttft = [p[a]["median_ttft_ms"] - p[b]["median_ttft_ms"] for p in valid]
    mean, low = mean_low(ratios) if ratios else (float("nan"), float("nan"))
    return {
        "concurrency": users,
        "against": b,
        "prompts_per_block": prompts,
        "pairs": blocks,
        "void": sum(p["void"] for p in blocks),
        "ratios": ratios,
        "ratio_mean": mean,
        "ratio_low95": low,
        "ttft_diff_ms": ttft,
        "failed": {
            a: sum(p[a].get("failed") or 0 for p in blocks),
            b: sum(p[b].get("failed") or 0 for p in blocks),
        },
    }


def summarize(levels: list[dict[str, Any]]) -> str:
    out = [
        "| users | cpu-both against | pairs (void) | output tok/s, medians of blocks | ratio: mean "
        "(one-sided 95% low), pair by pair | TTFT p50 ms, median paired difference | failed "
        "| interference, cores: median (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        b = lv["against"]
        valid = [p for p in lv["pairs"] if not p.get("void")]
        mine = statistics.median(p["both"]["output_throughput"] for p in valid or lv["pairs"])
        theirs = statistics.median(p[b]["output_throughput"] for p in valid or lv["pairs"])
        pairs = ", ".join(
            f"{p['both']['output_throughput'] / p[b]['output_throughput']:.3f}"
            + (" (void)" if p.get("void") else "")
            for p in lv["pairs"]
        )
        ttft = statistics.median(lv["ttft_diff_ms"]) if lv["ttft_diff_ms"] else float("nan")
        seen = [
            p[s]["cpu"]["interference"] for p in lv["pairs"] for s in ("both", b) if "cpu" in p[s]
        ]
        noise = f"{statistics.median(seen):.3f} ({max(seen):.3f})" if seen else "-"
        out.append(
            f"| {lv['concurrency']} | {b} | {len(lv['pairs'])} ({lv.get('void', 0)}) "
            f"| {mine:.1f} against {theirs:.1f} | {lv['ratio_mean']:.3f}x "
            f"({lv['ratio_low95']:.3f}): {pairs} | {ttft:+.1f} | {lv['failed']['both']}, "
            f"{b} {lv['failed'][b]} | {noise} |"
        )
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs of blocks per level")
    parser.add_argument(
        "--levels",
        default="1:q4_1,4:q4_1,8:q4_1,16:vllm",
        help="users:setup to compare cpu-both with, per level (q4_1, q8_0 or vllm)",
    )
    parser.add_argument("--waves", type=int, default=4, help="waves of users per block")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument(
        "--void-interference",
        type=float,
        default=0.15,
        help="a pair is void where a block's other setup, rest of machine and steal used more "
        "than this many cores on average",
    )
    add_serving_args(parser, "paired")
    args = parser.parse_args()
    try:
        args.plan = [(int(u), name) for u, name in (x.split(":") for x in args.levels.split(","))]
    except ValueError:
        parser.exit(
            2, f"--levels {args.levels!r}: expected users:setup pairs like 1:q4_1,16:vllm\n"
        )
    if args.pairs < 2 or args.waves < 1:
        parser.exit(2, "--pairs must be at least 2 and --waves at least 1\n")
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the `finally` stops the setups
    args = parse_args()
    tokenizer = vllm_weights(args.cache_path)
    table = setups(tokenizer)
    wanted = list(dict.fromkeys(name for _, name in args.plan))
    unknown = [n for n in wanted if n not in table or n in ("both", "default", "vllm-plain")]
    if unknown:
        sys.exit(f"--levels: cannot compare with {', '.join(unknown)} (q4_1, q8_0 or vllm)")
    args.out.mkdir(parents=True, exist_ok=True)
    env = serving_env(args)
    running: dict[str, Running] = {}
    result: dict[str, Any] = {
        "machine": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    levels: list[dict[str, Any]] = []
    try:
        # The comparators first (vLLM alone's start is the long one), then cpu-both on its own.
        for name in wanted:
            running[name] = start(table[name], args.out, env, args.ready_timeout)
            running[name].pause()
        running["both"] = start(table["both"], args.out, env, args.ready_timeout)
        result["ready_s"] = {n: r.ready_s for n, r in running.items()}
        for users, name in args.plan:
            levels.append(
                level(
                    running["both"],
                    running[name],
                    tokenizer,
                    users,
                    args.pairs,
                    args.waves,
                    seed=10_000 * users,
                    void_above=args.void_interference,
                )
            )
            result["levels"] = levels
            (args.out / "cpu_paired.json").write_text(json.dumps(result, indent=1))
        # RSS reads the same of a stopped process: nothing to continue for it.
        result["rss_mb"] = {n: memory(r.proc.pid, True) for n, r in running.items()}
    finally:
        for r in running.values():
            r.resume(settle_s=0)
            stop(r.proc)
    (args.out / "cpu_paired.json").write_text(json.dumps(result, indent=1))
    summary = summarize(levels) + f"\n\n{environment()}\n"
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
