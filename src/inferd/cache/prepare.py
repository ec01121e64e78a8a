"""Make a profile's model folder ready in the cache: reuse it if intact, else build it once.

A folder is reused only when its `provenance.json` matches the profile's source and every file it
lists still has the recorded sha256; anything else (missing, partial, altered) is rebuilt from
verified source blobs, in a staging folder that is moved into place atomically, under a per-model
lock so concurrent starts do the work once. The provenance records the chain source file hash ->
converter versions -> output file hashes, so anyone can check what the engine was given.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.cache.convert import converter_versions, run_conversion
from inferd.cache.fetch import fetch_source
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import ModelStore, sha256_file
from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import CacheError

PROVENANCE = "provenance.json"
LICENSE_FILE = "LICENSE"


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    provenance: dict[str, Any]
    reused: bool

    @property
    def license_text(self) -> str:
        try:
            return (self.path / LICENSE_FILE).read_text()
        except OSError:
            return ""


def variant(profile: Profile) -> str:
    """Folder name for what the engine loads: profiles that load the same thing share it."""
    return f"{profile.format}-{profile.precision}"


def _hash_tree(folder: Path, reporter: Reporter) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != PROVENANCE)
    total = sum(p.stat().st_size for p in files)
    with reporter.task(f"hash {folder.name}", total) as advance:
        return {p.name: sha256_file(p, advance) for p in files}


def _source_record(model: ModelEntry, profile: Profile) -> dict[str, Any]:
    source = model.source(profile.source)
    return {
        "kind": source.kind,
        "package": source.package,
        "version": source.version,
        "wheel": source.wheel,
        "wheel_sha256": source.wheel_sha256,
        "files": {f.path: f.sha256 for f in source.files},
    }


def _intact(
    folder: Path, model: ModelEntry, profile: Profile, reporter: Reporter
) -> dict[str, Any] | None:
    """The folder's provenance if it is complete and unaltered, else None (and why, to the user)."""
    try:
        record: dict[str, Any] = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != _source_record(model, profile):
        reporter.note(f"{folder} was built from another source; rebuilding it")
        return None
    expected: dict[str, str] = record.get("outputs", {})
    actual = _hash_tree(folder, reporter)
    if actual != expected:
        changed = sorted(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        reporter.note(f"{folder}: {', '.join(changed)} missing or altered; rebuilding it")
        return None
    return record


def _build(
    staged: Path, model: ModelEntry, profile: Profile, blobs: dict[str, Path], reporter: Reporter
) -> dict[str, Any]:
    """Fill `staged` with what the engine loads; returns the conversion part of the provenance."""
    source = model.source(profile.source)
    weights, license_file = source.file("weights"), source.file("license")
    assert weights is not None  # the schema requires a weights file per source
    if license_file is not None:
        os.link(blobs[license_file.path], staged / LICENSE_FILE)
    if profile.format == source.format:
        os.link(blobs[weights.path], staged / Path(weights.path).name)
        return {"tool": "none (files as shipped)"}
    if (source.format, profile.format) != ("gguf", "safetensors"):
        raise CacheError(f"no converter from {source.format} to {profile.format}")
    # transformers finds the GGUF by name next to where it writes; give it a readable name.
    gguf = staged.parent / Path(weights.path).name
    os.link(blobs[weights.path], gguf)
    try:
        seconds = run_conversion(gguf, staged, profile.precision, reporter)
    finally:
        gguf.unlink(missing_ok=True)
    return {"tool": "transformers", "versions": converter_versions(), "seconds": round(seconds, 1)}


def prepare(
    model: ModelEntry,
    profile: Profile,
    store: ModelStore,
    *,
    index_url: str,
    offline: bool = False,
    reporter: Reporter = SILENT,
) -> PreparedModel:
    folder = store.model_dir(model.id, variant(profile))
    with store.lock(model.id):
        record = _intact(folder, model, profile, reporter)
        if record is not None:
            return PreparedModel(folder, record, reused=True)
        source = model.source(profile.source)
        blobs = fetch_source(source, store, index_url=index_url, offline=offline, reporter=reporter)
        with store.staging(f"{model.id}-") as scratch:
            staged = scratch / "model"
            staged.mkdir()
            conversion = _build(staged, model, profile, blobs, reporter)
            record = {
                "model": model.id,
                "variant": variant(profile),
                "source": _source_record(model, profile),
                "conversion": conversion,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "outputs": _hash_tree(staged, reporter),
            }
            (staged / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
            store.commit_dir(staged, folder)
    return PreparedModel(folder, record, reused=False)
