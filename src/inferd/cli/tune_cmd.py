"""`inferd tune MODEL`: measure a model's profiles on this machine, so selection ranks by them.

Each profile (every runnable one, or those named with `--profile`) is prepared in the cache,
its engine started afresh and measured with `bench.tune`'s short fixed benchmark through
`server.tuning.started`, then stopped; the figures go into the cache under this machine's
fingerprint (`catalog.measured`), where `serve`, `profiles` and `--dry-run` find them. Profiles
that come close for one user and start in seconds are then measured again in turns
(`bench.tune.in_turns`), so a slow spell of the machine does not decide between them. The
table shows each profile's figures and what `serve` would now pick, and why.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferd.bench import tune
from inferd.cache import ModelStore
from inferd.cache.prepare import prepare
from inferd.catalog import hardware, measured, profiles
from inferd.catalog.hardware import Hardware
from inferd.catalog.measured import TYPICAL_PROMPT, Measurement
from inferd.catalog.profiles import Candidate
from inferd.catalog.schema import ModelEntry
from inferd.cli import progress as progress_bars
from inferd.cli.plan import catalog, model_entry, resolve, unavailable_engines
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.engines import Engine
from inferd.errors import NoProfileError, UsageError
from inferd.server import tuning


def _chosen(entry: ModelEntry, found: list[Candidate], wanted: list[str]) -> list[Candidate]:
    """The profiles to measure: those named (each must exist and run here), or every runnable."""
    if not wanted:
        runnable = [c for c in found if c.runnable]
        if not runnable:
            detail = "; ".join(f"{c.profile.id}: {c.reason}" for c in found)
            raise NoProfileError(f"no profile of {entry.id} runs on this machine: {detail}")
        return runnable
    by_id = {c.profile.id: c for c in found}
    picked = []
    for pid in dict.fromkeys(wanted):  # in order, once each
        c = by_id.get(pid)
        if c is None:
            raise UsageError(f"model {entry.id} has no profile {pid!r}; it has: {', '.join(by_id)}")
        if not c.runnable:
            raise UsageError(f"profile {pid} cannot run here, so it cannot be measured: {c.reason}")
        picked.append(c)
    return picked


def _engine(
    settings: Settings, entry: ModelEntry, c: Candidate, store: ModelStore, console: Console
) -> Engine:
    """The profile's engine, its files prepared in the cache (with bars)."""
    prepared = prepare(
        entry,
        c.profile,
        store,
        index_url=settings.pypi_index_url,
        offline=settings.offline,
        reporter=RichReporter(console),
    )
    engine = tuning.engine_of(entry, c.profile, store, prepared.path)
    engine.cache_dir.mkdir(parents=True, exist_ok=True)
    return engine


def _measure(
    settings: Settings, model: str, engine: Engine, fp: measured.Fingerprint, console: Console
) -> Measurement:
    profile = engine.profile
    plan = tune.steps(profile.max_running, profile.context)
    with progress_bars.steps(console) as progress:
        task = progress.add_task(f"{profile.id}: starting {profile.engine}", total=len(plan))

        def advance(step: tune.Step) -> None:
            progress.update(task, advance=1, description=f"{profile.id}: {step.describe()}")

        return asyncio.run(
            tune.tune(
                lambda: tuning.started(engine, settings.engine_ready_timeout_s),
                model=model,
                profile=profile.id,
                engine=profile.engine,
                fingerprint=fp.id,
                plan=plan,
                advance=advance,
            )
        )


def _in_turns(
    settings: Settings,
    engines: dict[str, Engine],
    figures: dict[str, Measurement],
    console: Console,
) -> dict[str, Measurement]:
    """The contenders (`tune.contenders`) among the profiles whose engines start in seconds,
    measured again in turns; empty when none are close."""
    close = tune.contenders(
        {pid: m for pid, m in figures.items() if m.engine in tuning.STARTS_IN_SECONDS}
    )
    if not close:
        return {}
    console.print(
        f"{' and '.join(close)} are within {tune.CLOSE:g}x of each other for one user: "
        f"measuring them again in turns ({tune.TURNS} rounds)"
    )

    with progress_bars.steps(console) as progress:
        task = progress.add_task("in turns", total=tune.TURNS * len(close))

        def advance(pid: str) -> None:
            progress.update(task, advance=1, description=f"in turns: {pid}")

        return asyncio.run(
            tuning.in_turns(
                {pid: engines[pid] for pid in close},
                figures,
                settings.engine_ready_timeout_s,
                advance=advance,
            )
        )


def _as_stored(m: Measurement) -> Measurement:
    """`m` as the cache keeps it (rounded), so the table shows what `inferd profiles` will."""
    return Measurement.from_json(m.model, m.profile, m.fingerprint, m.to_json())


def _row(c: Candidate, m: Measurement, seconds: float) -> dict[str, Any]:
    top = c.profile.max_running
    return {
        "profile": c.profile.id,
        "engine": c.profile.engine,
        "tok_s_1": round(m.rate(1), 1),
        "max_running": top,
        "tok_s_max": round(m.rate(top), 1),
        "ttft_128_ms": round(m.prompt_time(TYPICAL_PROMPT), 1),
        "ready_s": round(m.ready_s, 2),
        "took_s": round(seconds, 1),
        **m.to_json(),
    }


def run(settings: Settings, model_ref: str, wanted: list[str], *, as_json: bool) -> int:
    began = time.monotonic()
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    cat = catalog(settings)
    entry = model_entry(settings, model_ref, cat)
    hw: Hardware = hardware.detect()  # measured here: never another machine's captures
    fp = measured.fingerprint(hw)
    found = profiles.candidates(entry, hw, None, unavailable_engines(settings, hw))
    chosen = _chosen(entry, found, wanted)
    store = ModelStore(settings.cache_path)
    store.ensure_writable()
    console.print(f"tuning {entry.id} on {escape(fp.description)} (fingerprint {fp.id})")
    load = os.getloadavg()[0]
    if load > hw.cpu.usable_cores:
        # Figures measured beside other work rank profiles by that work, not by their speed.
        console.print(
            f"[yellow]this machine is busy (load {load:.1f} on {hw.cpu.usable_cores} usable "
            "cores): the figures will be noisy; tune again when it is quiet[/yellow]"
        )
    engines: dict[str, Engine] = {}
    figures: dict[str, Measurement] = {}
    took: dict[str, float] = {}
    for c in chosen:
        start = time.monotonic()
        engines[c.profile.id] = _engine(settings, entry, c, store, console)
        figures[c.profile.id] = _measure(settings, entry.id, engines[c.profile.id], fp, console)
        measured.save(store, figures[c.profile.id], fp.description)
        took[c.profile.id] = time.monotonic() - start
    again = _in_turns(settings, engines, figures, console)
    for m in again.values():
        measured.save(store, m, fp.description)
    figures.update(again)
    rows = [
        {
            **_row(c, _as_stored(figures[c.profile.id]), took[c.profile.id]),
            "in_turns": c.profile.id in again,
        }
        for c in chosen
    ]
    plan = resolve(settings, entry=entry, hw=hw)
    result = {
        "model": entry.id,
        "fingerprint": {"id": fp.id, "description": fp.description},
        "stored": str(measured.path(store, fp)),
        "profiles": rows,
        "selected": plan.profile_id,
        "why": plan.why,
        "took_s": round(time.monotonic() - began, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    _print(Console(highlight=False, soft_wrap=True), result)
    return 0


def _print(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"{result['model']} measured here", title_justify="left")
    for name in ("profile", "tok/s at 1", "tok/s at max", "TTFT 128 ms", "ready s", "took s"):
        table.add_column(name, no_wrap=True, justify="left" if name == "profile" else "right")
    for r in result["profiles"]:
        table.add_row(
            r["profile"],
            f"{r['tok_s_1']:.0f}",
            f"{r['tok_s_max']:.0f} ({r['max_running']})",
            f"{r['ttft_128_ms']:.0f}",
            f"{r['ready_s']:.1f}",
            f"{r['took_s']:.0f}",
        )
    console.print(table)
    again = [r["profile"] for r in result["profiles"] if r["in_turns"]]
    if again:
        console.print(
            f"in turns {' and '.join(again)}: measured again one after the other "
            f"({tune.TURNS} rounds); the figures the ranking reads are the medians"
        )
    fp = result["fingerprint"]
    console.print(f"machine  {escape(fp['description'])} (fingerprint {fp['id']})")
    console.print(f"stored   {result['stored']}")
    console.print(f"serve would pick: [bold]{result['selected']}[/bold]")
    console.print(f"why: {escape(result['why'])}")
    console.print(f"took {result['took_s']:.0f} s")
