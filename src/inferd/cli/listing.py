"""`inferd models` and `inferd profiles`: readable tables for people, `--json` for programs.

`profiles` shows, beside each profile, the figures `inferd tune` measured on this machine kind
(`catalog.measured`), and says whether the pick came from them or from the catalog's rules."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferd.cache import ModelStore
from inferd.catalog import hardware, measured, profiles
from inferd.catalog.estimate import GiB
from inferd.catalog.measured import TYPICAL_PROMPT, Measurement
from inferd.catalog.profiles import INCOMPATIBLE, RUNNABLE, SMALLER, Candidate
from inferd.cli import plan
from inferd.cli.plan import catalog, catalog_match, model_entry, unavailable_engines
from inferd.config import Settings
from inferd.errors import NoProfileError, UsageError

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


def _figures(c: Candidate, m: Measurement | None) -> dict[str, Any] | None:
    if m is None or m.engine != c.profile.engine:
        return None
    top = c.profile.max_running
    return {
        "tok_s_1": round(m.rate(1), 1),
        "tok_s_max": round(m.rate(top), 1),
        "max_running": top,
        "ttft_128_ms": round(m.prompt_time(TYPICAL_PROMPT), 1),
        "ready_s": round(m.ready_s, 2),
        "measured_at": m.measured_at,
        "prompt_ms": {str(k): v for k, v in sorted(m.prompt_ms.items())},
        "step_ms": {str(k): v for k, v in sorted(m.step_ms.items())},
    }


def _row(c: Candidate, selected: str | None, m: Measurement | None = None) -> dict[str, Any]:
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
        "measured": _figures(c, m),
    }


def list_profiles(settings: Settings, model_id: str | None, *, as_json: bool) -> int:
    models = catalog(settings)
    # A catalog id, or a model given by path (its entry generated from the files).
    entries = [model_entry(settings, model_id, models)] if model_id else list(models)
    hw = hardware.detect(settings.hardware)
    missing = unavailable_engines(settings, hw)
    store, fp = ModelStore(settings.cache_path), measured.fingerprint(hw)
    report = []
    for entry in entries:
        found = profiles.candidates(entry, hw, settings.max_model_len, missing)
        figures = measured.load(store, fp, entry.id)
        selected: str | None = None
        why: str | None = None
        ranked_by = "catalog"
        combos: list[dict[str, Any]] = []
        try:
            # What serve itself would run (a combined profile, where the catalog makes it so).
            served = plan.resolve(settings, entry=entry, hw=hw, profile="default")
            selected, why = served.profile_id, served.why
            if profiles.by_measurement(served.chosen, found, figures):
                ranked_by = "measurements"
        except NoProfileError:
            pass
        for combo in entry.combined:
            combos.append(_combined_row(settings, entry, hw, combo.id, selected))
        report.append(
            {
                "model": entry.id,
                "selected": selected,
                "why": why,
                "ranked_by": ranked_by,
                "by_goal": profiles.best_by_goal(found, figures),
                "catalog_match": catalog_match(entry, models) or None,
                "profiles": [_row(c, selected, figures.get(c.profile.id)) for c in found],
                "combined": combos,
            }
        )
    if as_json:
        body: dict[str, Any] = {
            "hardware": hw.as_dict(),
            "fingerprint": {"id": fp.id, "description": fp.description},
        }
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


def _combined_row(
    settings: Settings, entry: Any, hw: hardware.Hardware, combo: str, selected: str | None
) -> dict[str, Any]:
    """A combined profile (several engines behind the model): the profile each engine would
    run here, or why it cannot run."""
    try:
        served = plan.resolve(settings, entry=entry, hw=hw, profile=combo)
    except (NoProfileError, UsageError) as exc:
        return {"id": combo, "status": INCOMPATIBLE, "reason": str(exc), "selected": False}
    return {
        "id": combo,
        "status": RUNNABLE,
        "engines": [
            {"engine": p.profile.engine, "profile": p.profile.id} for p in served.engines_run
        ],
        "reason": None,
        "selected": combo == selected,
    }


def _note(r: dict[str, Any]) -> str:
    if r["status"] == SMALLER:
        return f"fits with --max-model-len {r['fits_context']}"
    return str(r["reason"] or "")


def _measured_cells(m: dict[str, Any] | None) -> list[str]:
    if m is None:
        return ["-"] * 4
    return [
        f"{m['tok_s_1']:.0f}",
        f"{m['tok_s_max']:.0f} ({m['max_running']})",
        f"{m['ttft_128_ms']:.0f} ms",
        f"{m['ready_s']:.1f}",
    ]


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
        shown = any(r["measured"] for r in rows)
        if shown:  # figures measured here (`inferd tune`)
            for name in ("tok/s 1", "tok/s max", "TTFT 128", "ready s"):
                table.add_column(name, no_wrap=True, justify="right")
        for r in rows:
            need, usable = r["memory_per_device_bytes"], r["usable_bytes"]
            memory = f"{need / GiB:.1f} / {usable / GiB:.1f}" if need else "-"
            name = r["id"] + (" *" if r["selected"] else "")
            cells = [name, r["engine"], r["precision"], str(r["tp"]), r["optimize"], memory]
            if shown:
                cells += _measured_cells(r["measured"])
            table.add_row(*cells)
        console.print(table)
        # Reasons go under the table, not in a column: they are long and would squeeze it.
        for r in rows:
            if note := _note(r):
                # Notes are data (install hints carry `[cpu]`), not markup.
                console.print(f"  {r['id']}: {escape(note)}", soft_wrap=True)
    for c in item.get("combined", []):
        mark = " *" if c["selected"] else ""
        if c["status"] == RUNNABLE:
            parts = " + ".join(e["profile"] for e in c["engines"])
            console.print(
                f"Combined: [bold]{c['id']}[/bold]{mark} = {parts} (both engines "
                "behind the model; a request goes to the one that finishes it soonest)"
            )
        else:
            console.print(f"Combined: {c['id']} cannot run here: {escape(c['reason'])}")
    smaller = [r for r in item["profiles"] if r["status"] == SMALLER]
    if item["selected"]:
        console.print(f"serve would pick: [bold]{item['selected']}[/bold] (marked *)")
        console.print(f"why: {escape(item['why'])}", soft_wrap=True)
        if item["ranked_by"] == "measurements":
            console.print("ranked by figures measured on this machine (columns tok/s, TTFT)")
        else:
            console.print(
                f"ranked by the catalog's rules; `inferd tune {item['model']}` measures the "
                "profiles here"
            )
    elif smaller:
        r = smaller[0]
        console.print(
            f"serve would refuse as it is; `inferd serve {item['model']} --profile "
            f"{r['id']} --max-model-len {r['fits_context']}` fits"
        )
    else:
        console.print("serve would refuse: no profile runs here (see the notes)")
