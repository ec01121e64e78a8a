"""`inferd cache ...`: pull, list, verify, rm, export, import. Tables for people, `--json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from inferd.cache import ModelStore, adapter_store, prepare, signing
from inferd.cache.archive import export, import_
from inferd.cache.store import hash_tree
from inferd.cli.plan import catalog, resolve
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.errors import IntegrityError, UsageError


def _console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _store(settings: Settings) -> ModelStore:
    store = ModelStore(settings.cache_path)
    store.ensure_writable()
    return store


def pull(settings: Settings, model_id: str, *, as_json: bool) -> int:
    plan = resolve(settings, model_id)
    plan.store.ensure_writable()
    prepared = prepare(
        plan.entry,
        plan.chosen.profile,
        plan.store,
        index_url=settings.pypi_index_url,
        offline=settings.offline,
        reporter=RichReporter(_console()),
    )
    info = {
        "model": plan.entry.id,
        "profile": plan.chosen.profile.id,
        "path": str(prepared.path),
        "reused": prepared.reused,
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        state = "already cached" if prepared.reused else "pulled"
        print(f"{plan.entry.id} ({plan.chosen.profile.id}) {state}: {prepared.path}")
    return 0


def list_cached(settings: Settings, *, as_json: bool) -> int:
    store = ModelStore(settings.cache_path)
    rows = [
        {
            "model": m.model,
            "variant": m.variant,
            "path": str(m.path),
            "size_bytes": m.size_bytes,
            "created": m.provenance.get("created"),
            "source": m.provenance.get("source", {}).get("id"),
        }
        for m in store.cached()
    ]
    if as_json:
        print(json.dumps({"root": str(store.root), "models": rows}, indent=2))
        return 0
    table = Table(
        "model",
        "variant",
        "size",
        "created",
        "source",
        title=f"cache {store.root}",
        title_justify="left",
    )
    for r in rows:
        table.add_row(
            r["model"],
            r["variant"],
            f"{r['size_bytes'] / 2**20:,.0f} MiB",
            r["created"] or "?",
            r["source"] or "?",
        )
    Console().print(table if rows else f"the cache at {store.root} holds no model")
    return 0


def sign(settings: Settings, model_id: str, key: Path, signature: Path | None) -> int:
    """Sign the folder the model's selected profile uses (it must be in the cache)."""
    plan = resolve(settings, model_id)
    folder = plan.model_dir
    if not folder.is_dir():
        raise UsageError(f"{model_id} ({folder.name}) is not in the cache; `inferd cache pull` it")
    written = signing.sign(folder, key, signature)
    print(f"signed {model_id}/{folder.name}: {written}")
    return 0


def _verify_signature(settings: Settings, model_id: str | None, signature: Path | None) -> Path:
    if not model_id:
        raise UsageError("--signature needs a MODEL")
    if settings.signing_public_key is None:
        raise UsageError("--signature needs --signing-public-key (INFERD_SIGNING_PUBLIC_KEY)")
    folder = resolve(settings, model_id).model_dir
    return signing.verify(folder, settings.signing_public_key, signature)


def verify(
    settings: Settings,
    model_id: str | None,
    *,
    as_json: bool,
    signature: bool = False,
    signature_file: Path | None = None,
) -> int:
    """Re-hash every file; exit 1 naming each file that differs from its provenance. With
    `signature`, the model's signature is checked too (first: it trusts nothing cached)."""
    checked = None
    if signature:
        checked = _verify_signature(settings, model_id, signature_file)
        if not as_json:
            print(f"{model_id}: signature {checked} verified")
    store = ModelStore(settings.cache_path)
    if model_id:
        catalog(settings).get(model_id)  # an unknown id is a usage error, not "nothing cached"
    results: list[dict[str, Any]] = []
    reporter = RichReporter(_console())
    # Models, then LoRA adapters kept for them (cache.adapter_store).
    for m in [*store.cached(model_id), *adapter_store.cached(store, model_id)]:
        expected: dict[str, str] = m.provenance.get("outputs", {})
        actual = hash_tree(m.path, reporter)
        bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        results.append(
            {
                "model": m.model,
                "variant": m.variant,
                "ok": not bad,
                "files": len(actual),
                "mismatched": bad,
            }
        )
    if as_json:
        out: dict[str, Any] = {"root": str(store.root), "results": results}
        if checked is not None:
            out["signature"] = {"path": str(checked), "verified": True}
        print(json.dumps(out, indent=2))
    else:
        for r in results:
            state = "ok" if r["ok"] else "MISMATCH: " + ", ".join(r["mismatched"])
            print(f"{r['model']}/{r['variant']}: {r['files']} files {state}")
        if not results:
            print(f"nothing to verify in {store.root}")
    failed = [f"{r['model']}/{r['variant']}/{name}" for r in results for name in r["mismatched"]]
    if failed:
        raise IntegrityError(
            f"{len(failed)} file(s) differ from their recorded sha256: " + ", ".join(failed)
        )
    return 0


def remove(settings: Settings, model_id: str) -> int:
    catalog(settings).get(model_id)
    removed = ModelStore(settings.cache_path).remove(model_id)
    print(
        f"removed {len(removed)} path(s) of {model_id}"
        if removed
        else f"{model_id} was not in the cache"
    )
    return 0


def export_cmd(settings: Settings, model_id: str, target: Path) -> int:
    store = ModelStore(settings.cache_path)
    manifest = export(model_id, target, store, catalog(settings), RichReporter(_console()))
    print(
        f"exported {model_id} ({', '.join(f['variant'] for f in manifest['folders'])}) to {target}"
    )
    return 0


def import_cmd(settings: Settings, archive: Path) -> int:
    manifest = import_(
        archive,
        _store(settings),
        catalog(settings),
        RichReporter(_console()),
        public_key=settings.signing_public_key,
    )
    print(
        f"imported {manifest['model']} "
        f"({', '.join(f['variant'] for f in manifest['folders'])}) into {settings.cache_path}"
    )
    return 0
