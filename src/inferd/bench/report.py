"""`inferd bench report RUN.json ... [--plot FILE.png]`: compare runs at a glance.

A table per run (one row per load level), and a figure with three panels: output throughput
against median time to first token (one line per run, a point per level: up and to the left is
better), then TTFT and ITL percentiles (p50 / p90 / p99) per level. Two engines or two profiles
benchmarked at the same levels land on the same axes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inferd.errors import UsageError


def load(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a bench run ({exc})") from None
        if not isinstance(run, dict) or "levels" not in run or "spec" not in run:
            raise UsageError(f"{path}: not a bench run (no levels)")
        run["name"] = run["spec"].get("label") or path.stem
        runs.append(run)
    return runs


def level_name(level: dict[str, Any]) -> str:
    if level.get("concurrency") is not None:
        return f"c={level['concurrency']}"
    return f"{level.get('request_rate')} req/s"


def rows(run: dict[str, Any]) -> list[list[str]]:
    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"

    out = []
    for lv in run["levels"]:
        goodput = lv.get("request_goodput")
        out.append(
            [
                level_name(lv),
                str(lv.get("completed")),
                str(lv.get("failed")),
                f"{lv.get('output_throughput', 0):.1f}",
                ms(lv.get("median_ttft_ms")),
                ms(lv.get("p99_ttft_ms")),
                ms(lv.get("median_itl_ms")),
                ms(lv.get("p99_itl_ms")),
                "-" if goodput is None else f"{goodput:.2f}",
            ]
        )
    return out


HEADERS = [
    "level",
    "ok",
    "failed",
    "tok/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "goodput req/s",
]


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    frontier, ttft, itl = axes
    for run in runs:
        levels = run["levels"]
        x = [lv.get("output_throughput") or 0 for lv in levels]
        y = [lv.get("median_ttft_ms") or 0 for lv in levels]
        frontier.plot(x, y, marker="o", label=run["name"])
        for lv, xi, yi in zip(levels, x, y, strict=True):
            frontier.annotate(
                level_name(lv), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    frontier.set(title="throughput vs latency", xlabel="output tokens/s", ylabel="median TTFT (ms)")
    frontier.legend()
    width = 0.8 / max(1, len(runs))
    for panel, metric in ((ttft, "ttft"), (itl, "itl")):
        for i, run in enumerate(runs):
            levels = run["levels"]
            positions = [j + i * width for j in range(len(levels))]
            for pct, alpha in (("p99", 0.3), ("p90", 0.6), ("p50", 1.0)):
                values = [lv.get(f"{pct}_{metric}_ms") or 0 for lv in levels]
                panel.bar(
                    positions,
                    values,
                    width,
                    alpha=alpha,
                    color=f"C{i}",
                    label=f"{run['name']} {pct}",
                )
        names = [level_name(lv) for lv in runs[0]["levels"]]
        panel.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names)
        panel.set(title=f"{metric.upper()} percentiles", ylabel="ms")
        panel.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
