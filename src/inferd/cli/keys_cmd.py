"""`inferd keys create|list|revoke`: manage the API keys file (salted hashes only)."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from inferd.config import Settings
from inferd.server.keys import KeyFile, KeyRing


def create(settings: Settings, name: str, rpm: int | None, tpm: int | None) -> int:
    key = KeyFile(settings.api_keys_file).create(name, rpm, tpm)
    print(key)
    print(
        f"key {name!r} created in {settings.api_keys_file}; it is shown only this once",
        file=sys.stderr,
    )
    return 0


def list_keys(settings: Settings, *, as_json: bool) -> int:
    rows = KeyRing(settings.api_keys_file).describe()
    if as_json:
        print(json.dumps({"file": str(settings.api_keys_file), "keys": rows}, indent=2))
        return 0
    table = Table(
        "name",
        "id",
        "created",
        "rpm",
        "tpm",
        "state",
        title=str(settings.api_keys_file),
        title_justify="left",
    )
    for r in rows:
        table.add_row(
            r["name"],
            r["id"],
            r["created"],
            str(r["rpm"] or "-"),
            str(r["tpm"] or "-"),
            "revoked" if r["revoked"] else "active",
        )
    Console().print(table if rows else f"no keys in {settings.api_keys_file}")
    return 0


def revoke(settings: Settings, name: str) -> int:
    KeyFile(settings.api_keys_file).revoke(name)
    print(f"key {name!r} revoked; a running service stops accepting it at once")
    return 0
