"""One file that carries a cached model to a machine without network: export and import.

The archive is a plain tar (weights do not compress) holding `manifest.json` first, then the
model's folders (`models/<id>/<variant>/...`, each with its provenance) and the source blobs they
were built from (`blobs/sha256/<hex>`). Import trusts nothing in it: every member must be a regular
file under one of those prefixes (no links, no absolute or `..` paths, nothing outside the cache);
blobs must hash to their names; each folder must hash to what its provenance records; only then
are they moved into the cache, atomically, under the model's lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from inferd import __version__
from inferd.cache.fetch import disk_errors
from inferd.cache.prepare import intact
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import CHUNK, PROVENANCE, ModelStore, hash_tree, tree_files
from inferd.catalog.catalog import Catalog
from inferd.errors import CacheError, IntegrityError

FORMAT = "inferd-cache-export/1"
MANIFEST = "manifest.json"
_BLOB = re.compile(r"^blobs/sha256/[0-9a-f]{64}$")


def export(
    model_id: str, target: Path, store: ModelStore, catalog: Catalog, reporter: Reporter = SILENT
) -> dict[str, Any]:
    entry = catalog.get(model_id)
    folders = store.cached(model_id)
    if not folders:
        raise CacheError(
            f"{model_id} is not in the cache at {store.root}; "
            f"run `inferd cache pull {model_id}` first"
        )
    for f in folders:
        source = entry.source(f.provenance.get("source", {}).get("id", ""))
        if intact(f.path, source, reporter) is None:
            raise IntegrityError(
                f"{f.path} is altered or incomplete; `inferd cache verify` names the files"
            )
    blob_hashes = sorted(
        {
            h
            for f in folders
            for h in (f.provenance["source"].get("files") or {}).values()
            if store.blob(h).is_file()
        }
    )
    manifest = {
        "format": FORMAT,
        "model": model_id,
        "inferd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "folders": [{"variant": f.variant, "provenance": f.provenance} for f in folders],
        "blobs": blob_hashes,
    }
    members = [
        (p, f"models/{model_id}/{f.variant}/{p.relative_to(f.path).as_posix()}")
        for f in folders
        for p in [*tree_files(f.path), f.path / PROVENANCE]
    ]
    members += [(store.blob(h), f"blobs/sha256/{h}") for h in blob_hashes]
    total = sum(p.stat().st_size for p, _ in members)
    partial = target.with_name(target.name + ".partial")
    data = json.dumps(manifest, indent=2).encode()
    try:
        with (
            disk_errors(store),
            tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar,
            reporter.task(f"export {model_id} -> {target.name}", total) as advance,
        ):
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, _BytesReader(data))
            for path, name in members:
                # Always a regular file: a blob and its model-folder copy are hard links on
                # disk, and tar would otherwise store the second as a link (refused on import).
                stat = path.stat()
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
                advance(stat.st_size)
        partial.rename(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return manifest


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk, self._at = self._data[self._at : end], min(end, len(self._data))
        return chunk


def _check_name(name: str, model_id: str) -> str:
    """The member's path if it may be written, else a refusal naming it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise CacheError(f"archive member {name!r} tries to escape the cache folder; refused")
    text = path.as_posix()
    if text == MANIFEST or _BLOB.match(text):
        return text
    if text.startswith(f"models/{model_id}/") and len(path.parts) >= 4:
        return text
    raise CacheError(f"archive member {name!r} is not part of model {model_id}; refused")


def _read_manifest(tar: tarfile.TarFile, catalog: Catalog) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise CacheError("not an inferd cache export: manifest.json must come first")
    fh = tar.extractfile(first)
    assert fh is not None
    try:
        manifest: dict[str, Any] = json.loads(fh.read())
    except ValueError as exc:
        raise CacheError(f"the archive's manifest is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"unknown archive format {manifest.get('format')!r} (expected {FORMAT})")
    catalog.get(str(manifest.get("model")))  # an unknown or malformed id stops here
    return manifest


def import_(
    archive: Path, store: ModelStore, catalog: Catalog, reporter: Reporter = SILENT
) -> dict[str, Any]:
    """Bring an exported model into this cache; returns its manifest."""
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the `with tar` below)
    except (OSError, tarfile.TarError) as exc:
        raise CacheError(f"cannot read {archive}: {exc}") from None
    with tar:
        manifest = _read_manifest(tar, catalog)
        model_id = manifest["model"]
        variants = {f["variant"]: f["provenance"] for f in manifest.get("folders", [])}
        with (
            store.lock("blobs", shared=True),
            store.lock(model_id),
            disk_errors(store),
            store.staging(f"{model_id}-import-") as staging,
            reporter.task(f"import {archive.name}", archive.stat().st_size) as advance,
        ):
            for member in tar:
                name = _check_name(member.name, model_id)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise CacheError(f"archive member {name!r} is a link or device; refused")
                _extract(tar, member, staging / name)
                advance(member.size)
            _commit_blobs(staging, store)
            for variant, provenance in variants.items():
                _commit_folder(staging, store, model_id, variant, provenance)
    return manifest


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    src = tar.extractfile(member)
    assert src is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)


def _commit_blobs(staging: Path, store: ModelStore) -> None:
    for blob in sorted((staging / "blobs" / "sha256").glob("*")):
        digest = hashlib.sha256()
        with blob.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            raise IntegrityError(f"archive blob {blob.name} has sha256 {digest.hexdigest()}")
        blob.replace(store.blob(blob.name))


def _commit_folder(
    staging: Path, store: ModelStore, model_id: str, variant: str, provenance: dict[str, Any]
) -> None:
    if not re.match(r"^[a-z0-9][a-z0-9._\-]*$", variant):
        raise CacheError(f"archive names an invalid folder {variant!r}; refused")
    folder = staging / "models" / model_id / variant
    if not folder.is_dir():
        raise CacheError(f"the archive's manifest lists {variant} but the archive lacks it")
    actual = hash_tree(folder)
    expected = provenance.get("outputs", {})
    if actual != expected:
        bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        raise IntegrityError(f"archive folder {variant}: {', '.join(bad)} missing or altered")
    # The manifest's record is the one that was checked; it is the one kept.
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    store.commit_dir(folder, store.model_dir(model_id, variant))
