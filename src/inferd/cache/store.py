"""The on-disk model store under `INFERD_CACHE_PATH`: content-addressed blobs and model folders.

Layout (every path below the cache root):

    blobs/sha256/<hex>                 a source file, named by its content hash
    models/<model-id>/<variant>/       what an engine loads (e.g. safetensors-bf16/), with
        provenance.json                where it came from and the sha256 of every file in it
    tmp/                               staging for downloads and conversions (same file system,
                                       so finished work is moved in with an atomic rename)
    locks/                             one lock file per model, so two processes never build
                                       the same folder at once
    engines/<engine>/                  an engine's own cache (e.g. vLLM's compiled kernels)

`fetch` fills blobs, `prepare` builds model folders; nothing else writes here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from inferd.errors import CacheNotWritableError

CHUNK = 1 << 20


def sha256_file(path: Path, advance: Callable[[int], object] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if advance:
                advance(len(chunk))
    return digest.hexdigest()


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
        path = self.root / "engines" / engine
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A scratch folder on the cache's file system, removed afterwards whatever happens."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive across processes: a second `inferd serve` waits instead of racing."""
        path = self.root / "locks" / f"{name}.lock"
        with path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
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
