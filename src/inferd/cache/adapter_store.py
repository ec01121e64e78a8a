"""Adapters kept in the cache like models: copied in, hashed, recorded, verified, reused.

Layout, beside `models/` (see `cache.store`):

    adapters/<base-model-id>/<adapter>-<digest>/   the PEFT files as served, plus
        adapter.gguf                               llama.cpp's form (llama.cpp profiles only)
        provenance.json                            source folder, sha256 of every source file
                                                   and of every file here, the converter

`<digest>` is the first 16 hex digits of the sha256 over the source files' hashes, so an adapter
whose files change is a new folder, and one that comes back unchanged is found again. The engines
load the copy here, never the user's folder: what runs is what was hashed and checked, even if
the user's files change under it. A folder is reused only if every file still has its recorded
sha256 (`intact`); otherwise it is rebuilt from the source. `server.adapters` calls `keep` for
each adapter that passed `cache.adapters.check` (with INFERD_REQUIRE_SIGNED, `keep` also checks
the folder's signature, `<adapter>-<digest>.sig` beside it as `inferd cache sign` writes it);
`inferd cache list|verify|sign|export` find folders with `cached` and `named`, and
`cache.adapter_archive` carries one to another cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.cache import lora_gguf, signing
from inferd.cache.adapters import FILES, NAME, AdapterSpec
from inferd.cache.store import PROVENANCE, CachedModel, ModelStore, hash_tree, sha256_file
from inferd.errors import AdapterError, CacheError, IntegrityError, UsageError

GGUF = "adapter.gguf"


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter as the engines load it from the cache."""

    name: str
    base: str
    path: Path
    rank: int
    provenance: dict[str, Any]

    @property
    def gguf(self) -> Path:
        return self.path / GGUF

    @property
    def digest(self) -> str:
        return str(self.provenance.get("digest", ""))


def adapters_dir(store: ModelStore, base: str) -> Path:
    return store.root / "adapters" / base


def cached(store: ModelStore, base: str | None = None) -> list[CachedModel]:
    """The adapter folders in the cache (of one base model's, or all), as `inferd cache verify`
    lists models: variant `adapter:<folder>`, provenance as recorded (or empty)."""
    root = store.root / "adapters"
    bases = [root / base] if base else sorted(p for p in root.glob("*") if p.is_dir())
    found = []
    for folder in (
        f for b in bases for f in sorted(b.glob("*")) if f.is_dir() and ".old-" not in f.name
    ):
        try:
            record = json.loads((folder / PROVENANCE).read_text())
        except (OSError, ValueError):
            record = {}
        found.append(CachedModel(folder.parent.name, f"adapter:{folder.name}", folder, record))
    return found


def adapter_name(found: CachedModel) -> str:
    """The adapter's id: as its provenance records it, else its folder's name less the digest."""
    name = found.provenance.get("adapter")
    return name if isinstance(name, str) and name else found.path.name.rsplit("-", 1)[0]


def named(store: ModelStore, ref: str) -> list[CachedModel]:
    """The cached adapter folders `ref` names: `ID`, or `ID-DIGEST` (one folder), either of them
    after `BASE/` (the base model's id)."""
    base, _, name = ref.rpartition("/")
    if base and not (NAME.match(base) and (store.root / "adapters" / base).is_dir()):
        return []
    return [a for a in cached(store, base or None) if name in (adapter_name(a), a.path.name)]


def one(store: ModelStore, ref: str) -> CachedModel:
    """The one cached adapter folder `ref` names; UsageError if none or several do."""
    found = named(store, ref)
    if not found:
        raise UsageError(f"no adapter {ref!r} in the cache at {store.root}")
    if len(found) > 1:
        which = ", ".join(f"{a.model}/{a.path.name}" for a in found)
        raise UsageError(f"{ref!r} names {len(found)} cached adapters ({which}); name one of them")
    return found[0]


def describe(found: CachedModel) -> dict[str, Any]:
    """A cached adapter as `inferd cache list` shows it."""
    record = found.provenance
    return {
        "adapter": adapter_name(found),
        "base": found.model,
        "digest": record.get("digest"),
        "rank": record.get("rank"),
        "gguf": GGUF in (record.get("outputs") or {}),
        "signed": signing.signature_path(found.path).is_file(),
        "path": str(found.path),
        "size_bytes": found.size_bytes,
        "source": (record.get("source") or {}).get("path"),
    }


def source_hashes(folder: Path) -> dict[str, str]:
    try:
        return {name: sha256_file(folder / name) for name in FILES}
    except OSError as exc:
        raise AdapterError(f"adapter {folder.name}: cannot read its files: {exc}") from None


def digest_of(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def intact(folder: Path) -> dict[str, Any] | None:
    """The folder's provenance if every file it lists is there with its sha256, else None."""
    try:
        record: dict[str, Any] = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    try:
        actual = hash_tree(folder)
    except OSError:
        return None
    return record if actual == record.get("outputs") else None


def verify(folder: Path) -> dict[str, Any]:
    """The provenance of a cached adapter folder; `IntegrityError` naming what changed."""
    try:
        record: dict[str, Any] = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{folder}: no readable {PROVENANCE} ({exc})") from None
    expected: dict[str, str] = record.get("outputs", {})
    actual = hash_tree(folder)
    changed = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if changed:
        raise IntegrityError(f"{folder}: {', '.join(changed)} missing or altered")
    return record


def keep(
    spec: AdapterSpec,
    base: str,
    store: ModelStore,
    *,
    gguf_base: Path | None = None,
    converter: Path | None = None,
    public_key: Path | None = None,
) -> StoredAdapter:
    """The adapter's cached folder, made (copied, converted for llama.cpp when `gguf_base` is
    given: the base model's folder, with `converter`, llama.cpp's script) or reused. With
    `public_key` (INFERD_REQUIRE_SIGNED) it must carry a signature by that key, made after
    it was kept (`inferd cache sign`): a folder made now has none, and is refused."""
    stored = _kept(spec, base, store, gguf_base, converter)
    if public_key is not None:
        check_signed(stored, public_key)
    return stored


def check_signed(stored: StoredAdapter, public_key: Path) -> None:
    """AdapterError saying why, unless the cached folder's signature verifies with the key."""
    sig = signing.signature_path(stored.path)
    if not sig.is_file():
        raise AdapterError(
            f"adapter {stored.name}: not signed (INFERD_REQUIRE_SIGNED is on): sign its cached "
            f"copy with `inferd cache sign {stored.base}/{stored.path.name} --key KEY`, then "
            "restart the service"
        )
    try:
        signing.verify(stored.path, public_key, sig)
    except IntegrityError as exc:
        raise AdapterError(f"adapter {stored.name}: {exc.message}") from None


def _kept(
    spec: AdapterSpec,
    base: str,
    store: ModelStore,
    gguf_base: Path | None,
    converter: Path | None,
) -> StoredAdapter:
    hashes = source_hashes(spec.folder)
    digest = digest_of(hashes)
    final = adapters_dir(store, base) / f"{spec.name}-{digest}"
    with store.lock(f"adapter-{base}-{spec.name}"):
        record = intact(final)
        if record is not None and (gguf_base is None or GGUF in record.get("outputs", {})):
            return StoredAdapter(spec.name, base, final, spec.rank, record)
        (store.root / "tmp").mkdir(parents=True, exist_ok=True)
        with store.staging(f"adapter-{spec.name}-") as staged:
            for name in FILES:
                shutil.copyfile(spec.folder / name, staged / name)
            copied = source_hashes(staged)
            if copied != hashes:  # changed while being copied: take it on the next scan
                raise AdapterError(f"adapter {spec.name}: its files changed while being read")
            converted: dict[str, Any] | None = None
            if gguf_base is not None:
                converted = _reuse_gguf(adapters_dir(store, base), digest, staged)
            if gguf_base is not None and converted is None:
                if converter is None:
                    raise CacheError(
                        "llama.cpp's LoRA converter is not installed: `make install` (or "
                        "`python -m inferd.engines.llamacpp_build`) keeps it beside llama-server"
                    )
                seconds = lora_gguf.run_conversion(staged, staged / GGUF, gguf_base, converter)
                converted = {
                    "script": str(converter),
                    "outtype": lora_gguf.OUTTYPE,
                    "seconds": round(seconds, 1),
                }
            record = {
                "adapter": spec.name,
                "base": base,
                "digest": digest,
                "rank": spec.rank,
                "source": {"path": str(spec.folder), "files": hashes},
                "converted": converted,
                "outputs": hash_tree(staged),
            }
            (staged / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
            store.commit_dir(staged, final)
    return StoredAdapter(spec.name, base, final, spec.rank, record)


def _reuse_gguf(folder: Path, digest: str, staged: Path) -> dict[str, Any] | None:
    """The same files kept under another name already have their GGUF: copy it (conversion
    depends on the files, not the name). Its record, or None."""
    for sibling in sorted(folder.glob(f"*-{digest}")):
        record = intact(sibling)
        if record is not None and GGUF in record.get("outputs", {}):
            shutil.copyfile(sibling / GGUF, staged / GGUF)
            converted: dict[str, Any] = record.get("converted") or {}
            return {**converted, "copied_from": sibling.name}
    return None
