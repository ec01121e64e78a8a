"""`inferd models` and `inferd profiles`: readable tables for people, `--json` for programs."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferd.catalog import hardware, profiles
from inferd.catalog.estimate import GiB
from inferd.catalog.profiles import INCOMPATIBLE, RUNNABLE, SMALLER, Candidate
from inferd.cli.plan import catalog, catalog_match, model_entry, unavailable_engines
from inferd.config import Settings
from inferd.errors import NoProfileError

GROUPS = (
    (RUNNABLE, "Runnable here"),
    (SMALLER, "Runnable here with a smaller context"),
    (INCOMPATIBLE, "Incompatible with this machine"),
)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def list_models(settings: Settings, *, as_json: bool) -> int:
    entries = list(catalog(settings))
    if as_json:
        print_json(
            [
                {
                    "id": e.id,
                    "name": e.name,
                    "task": e.task,
                    "license": e.license,
                    "parameters": e.parameters,
                    "max_context": e.architecture.max_context,
                    "profiles": [p.id for p in e.profiles],
                }
                for e in entries
            ]
        )
        return 0
    table = Table()
    table.add_column("id", no_wrap=True)
    for name in ("task", "params", "context", "license"):
        table.add_column(name, no_wrap=True)
    table.add_column("profiles", justify="right")
    for e in entries:
        size = e.parameters / 1e9
        params = f"{size:.1f}B" if size >= 1 else f"{e.parameters / 1e6:.0f}M"
        table.add_row(
            e.id, e.task, params, str(e.architecture.max_context), e.license, str(len(e.profiles))
        )
    Console().print(table)
    return 0


def _row(c: Candidate, selected: str | None) -> dict[str, Any]:
    p, est = c.profile, c.estimate
    return {
        "id": p.id,
        "engine": p.engine,
        "precision": p.precision,
        "tp": p.tp,
        "pp": p.pp,
        "optimize": p.optimize,
        "hardware": p.requires.device,
        "status": c.status,
        "reason": c.reason or None,
        "selected": p.id == selected,
        "context": p.context,
        "fits_context": est.fits_context if est else None,
        "memory_per_device_bytes": est.total if est else None,
        "usable_bytes": est.available if est else None,
        "notes": p.notes.strip() or None,
    }


def list_profiles(settings: Settings, model_id: str | None, *, as_json: bool) -> int:
    models = catalog(settings)
    # A catalog id, or a model given by path (its entry generated from the files).
    entries = [model_entry(settings, model_id, models)] if model_id else list(models)
    hw = hardware.detect(settings.hardware)
    optimize = None if settings.optimize == "auto" else settings.optimize
    missing = unavailable_engines(settings, hw)
    report = []
    for entry in entries:
        found = profiles.candidates(entry, hw, settings.max_model_len, missing)
        selected: str | None = None
        why: str | None = None
        try:
            chosen = profiles.select(entry, hw, optimize=optimize, found=found)
            selected, why = chosen.profile.id, profiles.explain(chosen, found, optimize)
        except NoProfileError:
            pass
        report.append(
            {
                "model": entry.id,
                "selected": selected,
                "why": why,
                "by_goal": profiles.best_by_goal(found),
                "catalog_match": catalog_match(entry, models) or None,
                "profiles": [_row(c, selected) for c in found],
            }
        )
    if as_json:
        body: dict[str, Any] = {"hardware": hw.as_dict()}
        body.update(report[0] if model_id else {"models": report})
        print_json(body)
        return 0
    console = Console(highlight=False)
    console.print(
        f"[bold]System[/bold]: {escape(hw.summary())}  [dim](from {escape(hw.source)})[/dim]"
    )
    for item in report:
        _print_model(console, item)
    return 0


def _note(r: dict[str, Any]) -> str:
    if r["status"] == SMALLER:
        return f"fits with --max-model-len {r['fits_context']}"
    return str(r["reason"] or "")


def _print_model(console: Console, item: dict[str, Any]) -> None:
    console.print(f"\n[bold]{item['model']}[/bold]")
    if item.get("catalog_match"):
        console.print(f"[yellow]better: {escape(item['catalog_match'])}[/yellow]", soft_wrap=True)
    for status, title in GROUPS:
        rows = [r for r in item["profiles"] if r["status"] == status]
        if not rows:
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("profile", no_wrap=True)
        for name in ("engine", "precision", "tp", "optimize"):
            table.add_column(name, no_wrap=True)
        table.add_column("GiB need/usable", no_wrap=True)
        for r in rows:
            need, usable = r["memory_per_device_bytes"], r["usable_bytes"]
            memory = f"{need / GiB:.1f} / {usable / GiB:.1f}" if need else "-"
            name = r["id"] + (" *" if r["selected"] else "")
            table.add_row(name, r["engine"], r["precision"], str(r["tp"]), r["optimize"], memory)
        console.print(table)
        # Reasons go under the table, not in a column: they are long and would squeeze it.
        for r in rows:
            if note := _note(r):
                # Notes are data (install hints carry `[cpu]`), not markup.
                console.print(f"  {r['id']}: {escape(note)}", soft_wrap=True)
    smaller = [r for r in item["profiles"] if r["status"] == SMALLER]
    if item["selected"]:
        console.print(f"serve would pick: [bold]{item['selected']}[/bold] (marked *)")
        console.print(f"why: {escape(item['why'])}", soft_wrap=True)
    elif smaller:
        r = smaller[0]
        console.print(
            f"serve would refuse as it is; `inferd serve {item['model']} --profile "
            f"{r['id']} --max-model-len {r['fits_context']}` fits"
        )
    else:
        console.print("serve would refuse: no profile runs here (see the notes)")
