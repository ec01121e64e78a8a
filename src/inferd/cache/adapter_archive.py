"""One file that carries a cached LoRA adapter to another machine: export and import.

The adapter's counterpart of `cache.archive` (models), read through its bounded tar stream
(`archive.opened`): a plain tar with `manifest.json` first, then the adapter's folder as
`cache.adapter_store` keeps it (`adapters/<base>/<id>-<digest>/`: the PEFT files, the GGUF
LoRA llama.cpp's converter made when the adapter ran on llama.cpp, `provenance.json`) and its
signature (`<id>-<digest>.sig`) when `inferd cache sign` made one. The GGUF travels with it so
that the other machine need not convert it again (that needs torch, transformers and the base
model's Hugging Face folder).

Import trusts nothing in the file. No catalog lists an adapter's hashes, so what is checked is
what the adapter says of itself, re-done here before anything reaches the cache: every member a
regular file of that one folder (no links, no other paths, each under its size bound); the
folder named `<id>-<digest>`, the digest the one `adapter_store` computes over the PEFT files'
hashes; every file hashing to what the provenance records, the PEFT files to its source
hashes; the safetensors header describing the file's bytes; and a signature, when there is one
and a public key is given, verifying. The GGUF is vouched for by that record alone unless the
adapter is signed: a site that needs more serves with INFERD_REQUIRE_SIGNED, which checks the
signature again. Given the adapter folder (`INFERD_LORA_PATH`), import also places the PEFT
files at `<folder>/<id>/`, where `inferd serve` finds them and then reuses the imported copy
(same digest) as it is.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from inferd import __version__
from inferd.cache import signing
from inferd.cache.adapter_store import GGUF, adapter_name, adapters_dir, digest_of, source_hashes
from inferd.cache.adapter_store import verify as verify_folder
from inferd.cache.adapters import CONFIG, FILES, MAX_CONFIG_BYTES, NAME, WEIGHTS, read_header
from inferd.cache.archive import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    extract_member,
    opened,
    write,
)
from inferd.cache.fetch import disk_errors
from inferd.cache.reporting import SILENT, Reporter
from inferd.cache.store import PROVENANCE, CachedModel, ModelStore, hash_tree, tree_files
from inferd.errors import CacheError, ConfigError, IntegrityError, UsageError

FORMAT = "inferd-adapter-export/1"
_DIGEST = re.compile(r"^[0-9a-f]{16}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A LoRA's weights, or its GGUF form: rank-64 adapters on every projection of a 70B model are
# about 1.7 GB in bf16; this leaves room and still bounds what a hostile file can make us write.
MAX_WEIGHTS_BYTES = 16 << 30
# Members of an export: the folder's files (4 at most), its signature, and folder entries a
# re-packed tar may add.
MAX_MEMBERS = 16


@dataclass(frozen=True)
class Imported:
    """What an import brought in, and where it went."""

    name: str
    base: str
    path: Path
    gguf: bool
    signature: str  # "verified", "not checked" (no public key given), or "none"
    placed: Path | None  # the PEFT files in the adapter folder, when one was given


def export(
    found: CachedModel, target: Path, store: ModelStore, reporter: Reporter = SILENT
) -> dict[str, Any]:
    """Write the cached adapter folder `found` (and its signature) into `target`; its manifest.
    An altered folder is refused (`inferd cache verify` names the files)."""
    record = verify_folder(found.path)
    prefix = f"adapters/{found.model}/{found.path.name}"
    members = [
        (p, f"{prefix}/{p.relative_to(found.path).as_posix()}")
        for p in [*tree_files(found.path), found.path / PROVENANCE]
    ]
    sig = signing.signature_path(found.path)
    if sig.is_file():
        members.append((sig, f"{prefix}.sig"))
    manifest = {
        "format": FORMAT,
        "adapter": adapter_name(found),
        "base": found.model,
        "folder": found.path.name,
        "inferd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": record,
        "signed": sig.is_file(),
    }
    # The adapter's members as a model's export writes them: one writer for both formats.
    write(target, manifest, members, store, reporter, f"export {manifest['adapter']}")
    return manifest


@dataclass(frozen=True)
class _Plan:
    """What the manifest may bring in, checked before any member is read."""

    name: str
    base: str
    folder: str
    provenance: dict[str, Any]

    @property
    def prefix(self) -> str:
        return f"adapters/{self.base}/{self.folder}"

    @property
    def outputs(self) -> dict[str, str]:
        outputs: dict[str, str] = self.provenance["outputs"]
        return outputs

    def bounds(self) -> dict[str, int]:
        """Each member the archive may hold, with the most bytes it may have."""
        sizes = {CONFIG: MAX_CONFIG_BYTES, WEIGHTS: MAX_WEIGHTS_BYTES, GGUF: MAX_WEIGHTS_BYTES}
        allowed = {f"{self.prefix}/{f}": sizes[f] for f in self.outputs}
        allowed[f"{self.prefix}/{PROVENANCE}"] = MAX_MANIFEST_BYTES
        allowed[f"{self.prefix}.sig"] = MAX_SIGNATURE_BYTES
        return allowed


def _plan(manifest: dict[str, Any]) -> _Plan:
    """The manifest's adapter, if its own account holds together (names, digest, hashes)."""
    name, base, folder = manifest.get("adapter"), manifest.get("base"), manifest.get("folder")
    for what, value in (("adapter id", name), ("base model id", base)):
        if not isinstance(value, str) or not NAME.match(value):
            raise CacheError(f"the archive names an invalid {what} {value!r}; refused")
    assert isinstance(name, str) and isinstance(base, str)
    digest = folder.removeprefix(f"{name}-") if isinstance(folder, str) else ""
    if folder != f"{name}-{digest}" or not _DIGEST.match(digest):
        raise CacheError(f"the archive names an invalid adapter folder {folder!r}; refused")
    record = manifest.get("provenance")
    if not isinstance(record, dict):
        raise CacheError("the archive's manifest carries no provenance for the adapter")
    if (record.get("adapter"), record.get("base"), record.get("digest")) != (name, base, digest):
        raise CacheError(
            f"archive adapter {folder}: its provenance is for another adapter or base model"
        )
    source = record.get("source")
    files = _hashes(source.get("files") if isinstance(source, dict) else None)
    outputs = _hashes(record.get("outputs"))
    if files is None or set(files) != set(FILES):
        raise CacheError(f"archive adapter {folder}: its provenance lists no valid source hashes")
    if outputs is None or not set(FILES) <= set(outputs) <= {*FILES, GGUF}:
        raise CacheError(f"archive adapter {folder}: its provenance lists no valid outputs")
    if digest_of(files) != digest:
        raise IntegrityError(
            f"archive adapter {folder}: its source hashes give digest {digest_of(files)}, not "
            f"{digest}; refused"
        )
    changed = [f for f in FILES if outputs[f] != files[f]]
    if changed:
        raise IntegrityError(
            f"archive adapter {folder}: {', '.join(changed)} differ from the source it records"
        )
    return _Plan(name, base, folder, record)


def _hashes(value: Any) -> dict[str, str] | None:
    """`value` if it maps file names to sha256 digests, else None."""
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) and _SHA256.match(v) for k, v in value.items()
    ):
        return value
    return None


def _admit(member: tarfile.TarInfo, plan: _Plan, seen: set[str]) -> str | None:
    """The member's path if it may be extracted (None: a folder entry), else one refusal."""
    path = PurePosixPath(member.name)
    name = path.as_posix()
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise CacheError(
            f"archive member {member.name!r} tries to escape the cache folder; refused"
        )
    if member.isdir() and (plan.prefix.startswith(f"{name}/") or name == plan.prefix):
        return None
    bound = plan.bounds().get(name)
    if bound is None:
        raise CacheError(f"archive member {name!r} is not part of adapter {plan.folder}; refused")
    if not member.isfile() or member.issparse():
        raise CacheError(f"archive member {name!r} is a link, device or sparse file; refused")
    if name in seen:
        raise CacheError(f"archive member {name!r} appears twice; refused")
    if member.size > bound:
        raise CacheError(f"archive member {name!r} is {member.size} bytes, past its bound; refused")
    seen.add(name)
    return name


def import_(
    archive: Path,
    store: ModelStore,
    reporter: Reporter = SILENT,
    *,
    public_key: Path | None = None,
    lora_path: Path | None = None,
) -> Imported:
    """Bring an exported adapter into this cache (and `lora_path`, when given)."""
    if lora_path is not None and not lora_path.is_dir():
        raise ConfigError(f"INFERD_LORA_PATH / --lora-path: {lora_path} is not a folder")
    store.ensure_writable()
    with opened(archive) as (tar, stream, manifest):
        if manifest.get("format") != FORMAT:
            raise CacheError(f"not an adapter export: format {manifest.get('format')!r}")
        plan = _plan(manifest)
        stream.limit = stream.count + sum(plan.bounds().values()) + MAX_MEMBERS * 4 * 512
        with (
            store.lock(f"adapter-{plan.base}-{plan.name}"),
            disk_errors(store),
            store.staging(f"adapter-{plan.name}-import-") as staging,
            reporter.task(f"import {archive.name}", archive.stat().st_size) as advance,
        ):
            seen: set[str] = set()
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise CacheError(f"the archive holds more than {MAX_MEMBERS} members; refused")
                if member.offset == 0:
                    continue  # the manifest, read already
                name = _admit(member, plan, seen)
                if name is not None:
                    extract_member(tar, member, staging / name)
                    advance(member.size)
            folder = staging / plan.prefix
            signature = _verified(folder, plan, public_key)
            placed, needed = _placing(plan, lora_path)
            final = adapters_dir(store, plan.base) / plan.folder
            store.commit_dir(folder, final)
            # The archive's state wins: a signature beside the folder it replaced signed that.
            sig = signing.signature_path(final)
            sig.unlink(missing_ok=True)
            if signature != "none":
                folder.with_name(f"{plan.folder}.sig").replace(sig)
    if placed is not None and needed:
        _place(final, placed)
    return Imported(plan.name, plan.base, final, GGUF in plan.outputs, signature, placed)


def _verified(folder: Path, plan: _Plan, public_key: Path | None) -> str:
    """Every check of the extracted folder; how its signature stands."""
    if not folder.is_dir():
        raise CacheError(f"the archive's manifest names {plan.folder} but the archive lacks it")
    actual = hash_tree(folder)
    bad = sorted(
        k for k in plan.outputs.keys() | actual.keys() if plan.outputs.get(k) != actual.get(k)
    )
    if bad:
        members = ", ".join(f"{plan.prefix}/{p}" for p in bad)
        raise IntegrityError(
            f"archive adapter {plan.folder}: {members} missing or altered (sha256 differs from "
            "its provenance); refused"
        )
    record = folder / PROVENANCE
    try:
        kept = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):
        kept = {}
    if kept is None:
        record.write_text(json.dumps(plan.provenance, indent=2) + "\n")
    elif kept != plan.provenance:  # a signature covers the record as the archive holds it
        raise IntegrityError(
            f"archive adapter {plan.folder}: its {PROVENANCE} differs from the manifest's"
        )
    read_header(folder / WEIGHTS, plan.name)  # its bytes as its header describes them
    sig = folder.with_name(f"{plan.folder}.sig")
    if not sig.is_file():
        return "none"
    if public_key is None:
        return "not checked"
    signing.verify(folder, public_key, sig)
    return "verified"


def _placing(plan: _Plan, lora_path: Path | None) -> tuple[Path | None, bool]:
    """Where the PEFT files go in the adapter folder (None: no folder given), and whether they
    must be written (not when the same files are there); a different adapter of that id there
    is refused before anything is written."""
    if lora_path is None:
        return None, False
    target = lora_path / plan.name
    if not target.exists():
        return target, True
    try:
        there = source_hashes(target)
    except CacheError:
        there = {}
    if there == plan.provenance["source"]["files"]:
        return target, False
    raise UsageError(
        f"{target} holds another adapter of that id; move it away, or import without "
        "INFERD_LORA_PATH / --lora-path"
    )


def _place(cached: Path, target: Path) -> None:
    """The PEFT files into `target`, whole: a service re-reading the folder never sees half an
    adapter (a dot-folder is skipped, and the rename is atomic)."""
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}-import-", dir=target.parent))
    try:
        for name in FILES:
            shutil.copyfile(cached / name, staged / name)
        staged.rename(target)
    except OSError as exc:
        raise CacheError(f"cannot place the adapter at {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
