"""The on-disk model store under `INFERD_CACHE_PATH`: content-addressed blobs and model folders.

Layout (every path below the cache root):

    blobs/sha256/<hex>                 a source file, named by its content hash
    models/<model-id>/<variant>/       what an engine loads (e.g. safetensors-bf16/), with
        provenance.json                where it came from and the sha256 of every file in it
    engines/<engine>/                  an engine's own cache (e.g. vLLM's compiled kernels)
    tmp/                               staging for downloads and conversions (same file system,
                                       so finished work is moved in with an atomic rename)
    locks/                             one lock file per model, so two processes never build
                                       the same folder at once

`fetch` fills blobs, `prepare` builds model folders, `archive` moves them between machines;
nothing else writes here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.cache.reporting import SILENT, Reporter
from inferd.errors import CacheNotWritableError

CHUNK = 1 << 20
PROVENANCE = "provenance.json"


def sha256_file(path: Path, advance: Callable[[int], object] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if advance:
                advance(len(chunk))
    return digest.hexdigest()


def tree_files(folder: Path) -> list[Path]:
    """Every file below `folder` except the provenance record, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PROVENANCE)


def hash_tree(folder: Path, reporter: Reporter = SILENT) -> dict[str, str]:
    """sha256 of every file below `folder`, keyed by its relative POSIX path."""
    files = tree_files(folder)
    total = sum(p.stat().st_size for p in files)
    with reporter.task(f"hash {folder.name}", total) as advance:
        return {p.relative_to(folder).as_posix(): sha256_file(p, advance) for p in files}


@dataclass(frozen=True)
class CachedModel:
    model: str
    variant: str
    path: Path
    provenance: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_writable(self) -> None:
        """Create the layout, or say plainly why the cache folder cannot be used."""
        try:
            for sub in ("blobs/sha256", "models", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root / "tmp"):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CacheNotWritableError(
                f"cache folder {self.root} is not writable ({reason}); "
                "set INFERD_CACHE_PATH or --cache-path to a folder you can write"
            ) from None

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def model_dir(self, model_id: str, variant: str) -> Path:
        return self.root / "models" / model_id / variant

    def engine_dir(self, engine: str) -> Path:
        """An engine's own cache (compiled kernels and the like); it may be deleted any time."""
        return self.root / "engines" / engine

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A scratch folder on the cache's file system, removed afterwards whatever happens."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clear_leftovers(self, model_id: str) -> None:
        """Remove what an interrupted run for this model left. Call with the model's lock held:
        then no live process can be using these."""
        for leftover in (self.root / "tmp").glob(f"{model_id}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in (self.root / "models" / model_id).glob("*.old-*"):
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Across processes: a second `inferd` waits instead of racing. Builders hold the
        `blobs` lock shared; garbage collection holds it exclusively."""
        path = self.root / "locks" / f"{name}.lock"
        with path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def commit_dir(staged: Path, final: Path) -> None:
        """Move a finished folder into place atomically, replacing an old or broken one."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = final.with_name(final.name + f".old-{os.getpid()}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staged.rename(final)

    def cached(self, model_id: str | None = None) -> list[CachedModel]:
        """Model folders with a provenance record (complete ones), optionally of one model."""
        found = []
        pattern = f"{model_id}/*/{PROVENANCE}" if model_id else f"*/*/{PROVENANCE}"
        for record_path in sorted((self.root / "models").glob(pattern)):
            folder = record_path.parent
            if ".old-" in folder.name:
                continue
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                record = {}
            found.append(CachedModel(folder.parent.name, folder.name, folder, record))
        return found

    def remove(self, model_id: str) -> list[Path]:
        """Delete a model's folders and the blobs nothing else refers to; returns what went."""
        removed = []
        with self.lock(model_id):
            folder = self.root / "models" / model_id
            if folder.exists():
                shutil.rmtree(folder)
                removed.append(folder)
        removed += self.collect_garbage()
        return removed

    def collect_garbage(self) -> list[Path]:
        """Blobs no model folder's provenance names any more."""
        gone = []
        with self.lock("blobs"):
            wanted = {
                h
                for m in self.cached()
                for h in (m.provenance.get("source", {}).get("files") or {}).values()
            }
            for blob in (self.root / "blobs" / "sha256").iterdir():
                # By exact name: with this lock held no builder is writing, so every
                # `<hex>.<random>.partial` is what an interrupted run left.
                if blob.name not in wanted:
                    blob.unlink(missing_ok=True)
                    gone.append(blob)
        return gone
