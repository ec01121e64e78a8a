"""`inferd cache ...`: pull, list, verify, sign, rm, export, import. Tables for people, `--json`.

Models and the LoRA adapters kept for them (`cache.adapter_store`) alike: where a command takes
a MODEL, a cached adapter's id (or `BASE/ID`, `ID-DIGEST`) names that adapter instead, unless a
catalog model has that id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from inferd.cache import ModelStore, adapter_archive, adapter_store, prepare, signing
from inferd.cache.adapters import FILES
from inferd.cache.archive import export, format_of, import_
from inferd.cache.store import CachedModel, hash_tree
from inferd.cli.plan import catalog, resolve
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.errors import IntegrityError, UnknownModelError, UsageError


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
    adapters = [adapter_store.describe(a) for a in adapter_store.cached(store)]
    if as_json:
        out = {"root": str(store.root), "models": rows, "adapters": adapters}
        print(json.dumps(out, indent=2))
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
    console = Console()
    console.print(table if rows else f"the cache at {store.root} holds no model")
    if adapters:
        console.print(_adapter_table(adapters))
    return 0


def _adapter_table(adapters: list[dict[str, Any]]) -> Table:
    table = Table("adapter", "base model", "digest", "rank", "size", "forms", "signed")
    table.title, table.title_justify = "LoRA adapters", "left"
    for a in adapters:
        table.add_row(
            a["adapter"],
            a["base"],
            a["digest"] or "?",
            str(a["rank"] or "?"),
            f"{a['size_bytes'] / 2**20:,.1f} MiB",
            "PEFT + GGUF" if a["gguf"] else "PEFT",
            "yes" if a["signed"] else "no",
        )
    return table


def _adapter(settings: Settings, ref: str | None) -> CachedModel | None:
    """The cached adapter `ref` names, if it names one and no catalog model has that id."""
    if not ref or ref in {e.id for e in catalog(settings)}:
        return None
    store = ModelStore(settings.cache_path)
    return adapter_store.one(store, ref) if adapter_store.named(store, ref) else None


def _neither(exc: UnknownModelError) -> UnknownModelError:
    return UnknownModelError(
        f"{exc.message}; nor is it a LoRA adapter in the cache (`inferd cache list`)"
    )


def sign(settings: Settings, model_id: str, key: Path, signature: Path | None) -> int:
    """Sign the folder the model's selected profile uses (it must be in the cache), or a
    cached adapter's folder."""
    adapter = _adapter(settings, model_id)
    if adapter is not None:
        written = signing.sign(adapter.path, key, signature)
        name = adapter_store.adapter_name(adapter)
        print(f"signed adapter {name} ({adapter.model}/{adapter.path.name}): {written}")
        return 0
    try:
        plan = resolve(settings, model_id)
    except UnknownModelError as exc:
        raise _neither(exc) from None
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
    adapter = _adapter(settings, model_id)
    folder = adapter.path if adapter is not None else resolve(settings, model_id).model_dir
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
    adapter = _adapter(settings, model_id)
    if adapter is not None:
        folders = [adapter]
    else:
        if model_id:
            try:  # an unknown id is a usage error, not "nothing cached"
                catalog(settings).get(model_id)
            except UnknownModelError as exc:
                raise _neither(exc) from None
        # Models, then LoRA adapters kept for them (cache.adapter_store).
        folders = [*store.cached(model_id), *adapter_store.cached(store, model_id)]
    results: list[dict[str, Any]] = []
    reporter = RichReporter(_console())
    for m in folders:
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
    reporter = RichReporter(_console())
    adapter = _adapter(settings, model_id)
    if adapter is not None:
        manifest = adapter_archive.export(adapter, target, store, reporter)
        forms = "PEFT + GGUF" if adapter_store.GGUF in manifest["provenance"]["outputs"] else "PEFT"
        signed = "signed" if manifest["signed"] else "unsigned"
        print(
            f"exported adapter {manifest['adapter']} for {adapter.model} ({forms}, {signed}) "
            f"to {target}"
        )
        return 0
    try:
        manifest = export(model_id, target, store, catalog(settings), reporter)
    except UnknownModelError as exc:
        raise _neither(exc) from None
    print(
        f"exported {model_id} ({', '.join(f['variant'] for f in manifest['folders'])}) to {target}"
    )
    return 0


def import_cmd(settings: Settings, archive: Path) -> int:
    reporter = RichReporter(_console())
    if format_of(archive) == adapter_archive.FORMAT:
        return _import_adapter(settings, archive, reporter)
    manifest = import_(
        archive,
        _store(settings),
        catalog(settings),
        reporter,
        public_key=settings.signing_public_key,
    )
    print(
        f"imported {manifest['model']} "
        f"({', '.join(f['variant'] for f in manifest['folders'])}) into {settings.cache_path}"
    )
    return 0


def _import_adapter(settings: Settings, archive: Path, reporter: RichReporter) -> int:
    done = adapter_archive.import_(
        archive,
        _store(settings),
        reporter,
        public_key=settings.signing_public_key,
        lora_path=settings.lora_path,
    )
    forms = "PEFT + GGUF" if done.gguf else "PEFT"
    signature = {
        "verified": f"signature verified with {settings.signing_public_key}",
        "not checked": "signed (not checked here: no --signing-public-key)",
        "none": "unsigned",
    }[done.signature]
    print(f"imported adapter {done.name} for {done.base} ({forms}, {signature}) into {done.path}")
    if done.placed is not None:
        lora = done.placed.parent
        print(f"placed at {done.placed}: `inferd serve --lora-path {lora}` serves it")
    else:
        print(
            "to serve it, import with --lora-path DIR (INFERD_LORA_PATH), or copy its "
            f"{' and '.join(FILES)} into DIR/{done.name}/"
        )
    return 0
