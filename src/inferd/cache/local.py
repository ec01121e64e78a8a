"""Models given by path in the cache: their generated entries, and the folders engines load.

The entry (`catalog.local_entry`) is kept in `local/<key>.json` (the key: a hash of the model's
absolute path) with every file's size, modification time and sha256, so the next start reads
it back instead of hashing gigabytes again; a file whose size or mtime changed (or that came or
went) is noticed, and the model is inspected and hashed anew. `inferd cache verify` re-hashes
every file whatever its mtime.

The files are used in place, not copied: a model can be tens of gigabytes, and the user already
has it. What the engine loads is `models/<id>/<variant>/` as for catalog models, holding
symbolic links to the user's files and `provenance.json` (source path, every file's sha256,
the conversion). The one exception is conversion: vLLM cannot load a GGUF, so a GGUF's vLLM
profile gets bf16 safetensors converted once into that folder (`cache.convert`), rebuilt when
the GGUF changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from inferd.cache.convert import converter_versions, run_conversion
from inferd.cache.fetch import disk_errors
from inferd.cache.prepare import PreparedModel, intact, source_record, variant
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import PROVENANCE, ModelStore, hash_tree, sha256_file
from inferd.catalog import local_model
from inferd.catalog.local_entry import local_entry
from inferd.catalog.schema import ModelEntry, Profile, Source
from inferd.errors import UsageError

# Bumped when the generated entry's shape changes: older records are then regenerated.
RECORD_VERSION = 1


def _record_path(store: ModelStore, path: Path) -> Path:
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    return store.root / "local" / f"{key}.json"


def _stats(root: Path, names: list[str]) -> dict[str, list[int]]:
    out = {}
    for name in names:
        st = (root / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def entry_for(
    path: Path, store: ModelStore, model_id: str, reporter: Reporter = SILENT
) -> ModelEntry:
    """The entry of the model at `path` (absolute), from the cache if its files are unchanged."""
    root = path if path.is_dir() else path.parent
    names = local_model.file_names(path) if path.exists() else []
    record_file = _record_path(store, path)
    changed = False
    try:
        record = json.loads(record_file.read_text())
        stats = _stats(root, names)
        if record.get("version") == RECORD_VERSION and record.get("files") == stats:
            entry = ModelEntry.model_validate(record["entry"])
            return entry if entry.id == model_id else entry.model_copy(update={"id": model_id})
        changed = True
    except (OSError, ValueError, KeyError, ValidationError):
        pass  # no record, or an unreadable one: inspect the files
    found = local_model.inspect(path)  # refuses what is not a model, before any hashing
    if changed:
        reporter.note(f"{path} changed since inferd last read it: hashing it again")
    stats = _stats(root, [name for name, _ in found.files])
    hashes = {}
    total = sum(size for size, _ in stats.values())
    with reporter.task(f"sha256 {path.name} ({len(stats)} file(s))", total) as advance:
        for name, _ in found.files:
            hashes[name] = (sha256_file(root / name, advance), stats[name][0])
    entry = local_entry(found, model_id, hashes)
    _keep(record_file, {"version": RECORD_VERSION, "path": str(path), "files": stats}, entry)
    return entry


def _keep(record_file: Path, record: dict[str, Any], entry: ModelEntry) -> None:
    """Write the record atomically. A cache that cannot be written only costs the next start a
    re-read (`serve` refuses an unwritable cache before it needs one; `profiles` need not)."""
    record["entry"] = entry.model_dump(mode="json")
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        staged = record_file.with_name(f"{record_file.name}.{os.getpid()}.partial")
        staged.write_text(json.dumps(record, indent=1) + "\n")
        staged.replace(record_file)
    except OSError:
        pass


def _linked(folder: Path, source: Source) -> dict[str, Any] | None:
    """The folder's provenance if it links exactly the source's files (checked by stat: the
    entry was just matched against their sizes and mtimes)."""
    try:
        record: dict[str, Any] = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != source_record(source):
        return None
    for f in source.files:
        link = folder / f.path
        if not link.is_symlink() or os.readlink(link) != str(Path(source.path) / f.path):
            return None
    return record


def prepare_local(
    model: ModelEntry,
    profile: Profile,
    store: ModelStore,
    reporter: Reporter = SILENT,
    on_spawn: Callable[[int], None] | None = None,
) -> PreparedModel:
    """The folder `profile`'s engine loads for a model given by path (see the module's doc)."""
    source = model.source(profile.source)
    folder = store.model_dir(model.id, variant(profile))
    converted = source.format != profile.format
    with store.lock(model.id):
        store.clear_leftovers(model.id)
        record = intact(folder, source, reporter) if converted else _linked(folder, source)
        if record is not None:
            return PreparedModel(folder, record, reused=True)
        with store.staging(f"{model.id}-") as scratch, disk_errors(store):
            staged = scratch / "model"
            staged.mkdir()
            if converted:
                conversion = _convert(model, profile, source, staged, scratch, reporter, on_spawn)
                outputs = None
            else:
                for f in source.files:
                    (staged / f.path).symlink_to(Path(source.path) / f.path)
                conversion = {"tool": "none (files used in place: links to them)"}
                outputs = {f.path: f.sha256 for f in source.files}
            licence = source.file("license")
            record = {
                "model": model.id,
                "variant": variant(profile),
                "source": source_record(source),
                "license_file": licence.path if licence and not converted else None,
                "conversion": conversion,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                # Links: the source's hashes (just computed or matched by stat); converted
                # files: hashed here, like every cache-built folder.
                "outputs": outputs if outputs is not None else hash_tree(staged, reporter),
            }
            (staged / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
            store.commit_dir(staged, folder)
    return PreparedModel(folder, record, reused=False)


def _convert(
    model: ModelEntry,
    profile: Profile,
    source: Source,
    staged: Path,
    scratch: Path,
    reporter: Reporter,
    on_spawn: Callable[[int], None] | None,
) -> dict[str, Any]:
    weights = source.file("weights")
    if source.format != "gguf" or profile.format != "safetensors" or weights is None:
        raise UsageError(f"no converter from {source.format} to {profile.format}")
    # transformers reads the GGUF by name from a folder of its own: link it there.
    gguf = scratch / "gguf" / weights.path
    gguf.parent.mkdir()
    gguf.symlink_to(Path(source.path) / weights.path)
    seconds = run_conversion(
        gguf, staged, profile.precision, reporter, chat=model.task == "chat", on_spawn=on_spawn
    )
    return {"tool": "transformers", "versions": converter_versions(), "seconds": round(seconds, 1)}


# Written into a hub download's folder once snapshot_download has returned (see fetch_hub).
HUB_DONE = ".inferd-complete"


def fetch_hub(repo: str, revision: str, store: ModelStore, *, offline: bool) -> Path:
    """`hf://ORG/NAME@REVISION`: the repository's files downloaded into `hub/` of the cache,
    then served like a folder given by path. A hub that cannot be reached, or a download that
    fails, is a usage error (the user named it), in one line. A download counts once it has
    ended (`HUB_DONE` written after it): an interrupted one is resumed by the next start, never
    served half-way."""
    folder = store.root / "hub" / repo.replace("/", "--") / (revision or "main")
    if (folder / HUB_DONE).is_file():
        return folder
    if offline:
        raise UsageError(
            f"hf://{repo}: not in the cache and --offline is set; download the folder on a "
            "machine that reaches the hub and serve it by path"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("hf:// models need the huggingface_hub package") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "LICENSE*"]
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(
            repo, revision=revision or None, local_dir=folder, allow_patterns=patterns
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UsageError(
            f"hf://{repo}: no such repository or revision {revision or 'main'} on the hub "
            "(or it needs a token: HF_TOKEN)"
        ) from None
    except Exception as exc:  # the hub client raises many kinds (HTTP, connection, DNS, OS)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"hf://{repo}: the download from the Hugging Face hub failed ({reason})"
        ) from None
    (folder / HUB_DONE).write_text(f"{repo}@{revision or 'main'}\n")
    return folder
