"""`inferd bench` and `inferd bench report`: run a benchmark with a progress bar; compare runs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from inferd.bench import report
from inferd.bench.runner import BenchRun, BenchSpec, environment, run_level
from inferd.cache import ModelStore
from inferd.cli import progress as progress_bars
from inferd.config import Settings
from inferd.errors import UsageError


def default_tokenizer(settings: Settings, model: str) -> str:
    """A folder with `model`'s tokenizer (the load generator counts prompt tokens with it).

    A cached safetensors folder has one; a cached GGUF carries its tokenizer inside, which is
    written out once as a Hugging Face tokenizer folder under the cache's `tokenizers/`."""
    store = ModelStore(settings.cache_path)
    cached = list(store.cached(model))
    for folder in cached:
        if (folder.path / "tokenizer.json").is_file():
            return str(folder.path)
    for folder in cached:
        for gguf in sorted(folder.path.glob("*.gguf")):
            return str(_tokenizer_from_gguf(gguf, store.root / "tokenizers" / model))
    raise UsageError(
        f"no tokenizer for {model!r} in the cache at {settings.cache_path}: "
        "pass --tokenizer PATH (a folder with tokenizer.json, or a hub id)"
    )


def _tokenizer_from_gguf(gguf: Path, out: Path) -> Path:
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer  # heavy; only when a tokenizer must be made

    staging = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # whole or not at all: a later run never finds half a folder
    return out


def run(spec: BenchSpec, out: Path, *, as_json: bool) -> int:
    console = Console(stderr=True, highlight=False)
    levels = spec.levels()
    results = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with progress_bars.steps(console) as progress:
        task = progress.add_task(f"bench {spec.url} ({spec.model})", total=len(levels))
        for level in levels:
            progress.update(task, description=f"bench {report.level_name(level)}")
            results.append(run_level(spec, level))
            progress.advance(task)
    bench = BenchRun(spec, started, results, environment())
    json_path, csv_path = bench.write(out)
    if as_json:
        print(json.dumps(bench.to_json(), indent=2))
    else:
        _table(Console(), {"name": spec.label or out.stem, **bench.to_json()})
        print(f"results: {json_path} and {csv_path}")
    return 0


def _table(console: Console, run: dict[str, object]) -> None:
    table = Table(*report.HEADERS, title=str(run["name"]), title_justify="left")
    for row in report.rows(run):
        table.add_row(*row)
    console.print(table)


def show_report(paths: list[Path], plot: Path | None, *, as_json: bool) -> int:
    runs = report.load(paths)
    if as_json:
        print(json.dumps([{"name": r["name"], "levels": r["levels"]} for r in runs], indent=2))
    else:
        console = Console()
        for run_data in runs:
            _table(console, run_data)
    if plot is not None:
        report.plot(runs, plot)
        print(f"plot: {plot}")
    return 0
