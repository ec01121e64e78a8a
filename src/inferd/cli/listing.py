"""`inferd models` and `inferd profiles`: readable tables for people, `--json` for programs."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from inferd.catalog import Catalog, hardware, profiles


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def list_models(*, as_json: bool) -> int:
    entries = list(Catalog.load())
    if as_json:
        _print_json(
            [
                {
                    "id": e.id,
                    "name": e.name,
                    "task": e.task,
                    "license": e.license,
                    "parameters": e.parameters,
                    "profiles": [p.id for p in e.profiles],
                }
                for e in entries
            ]
        )
        return 0
    table = Table("id", "task", "parameters", "license", "profiles")
    for e in entries:
        table.add_row(
            e.id,
            e.task,
            f"{e.parameters / 1e6:,.0f}M",
            e.license,
            ", ".join(p.id for p in e.profiles),
        )
    Console().print(table)
    return 0


def list_profiles(model_id: str | None, *, as_json: bool) -> int:
    catalog = Catalog.load()
    entries = [catalog.get(model_id)] if model_id else list(catalog)
    hw = hardware.detect()
    found = [(e, profiles.candidates(e, hw)) for e in entries]
    rows = []
    for entry, candidates in found:
        chosen = next((c.profile.id for c in candidates if c.runnable), None)
        rows += [(entry, c, c.profile.id == chosen) for c in candidates]
    if as_json:
        _print_json(
            {
                "hardware": hw.summary(),
                "profiles": [
                    {
                        "model": e.id,
                        "profile": c.profile.id,
                        "tags": c.profile.tags,
                        "runnable": c.runnable,
                        "default": default,
                        "reasons": list(c.reasons),
                        "notes": c.profile.notes.strip(),
                    }
                    for e, c, default in rows
                ],
            }
        )
        return 0
    console = Console()
    console.print(f"hardware: {hw.summary()}")
    table = Table(
        "model", "profile", "engine", "precision", "optimize", "runs here", show_lines=True
    )
    for e, c, default in rows:
        status = "yes (default)" if default else "yes" if c.runnable else "; ".join(c.reasons)
        tags = c.profile.tags
        table.add_row(
            e.id, c.profile.id, tags["engine"], tags["precision"], tags["optimize"], status
        )
    console.print(table)
    for _, c, _ in rows:
        if c.profile.notes:
            console.print(f"\n[bold]{c.profile.id}[/bold]: {c.profile.notes.strip()}")
    return 0
