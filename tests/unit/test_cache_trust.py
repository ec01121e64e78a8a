"""The cache trusts only the catalog: wheel names are checked before they become paths, nothing
unverified ever sits at a final path, and an imported converted folder is re-derived here from
the catalog's verified sources, or carries a signature that verifies."""

from __future__ import annotations

import importlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from inferd.cache import prepare
from inferd.cache.archive import import_
from inferd.cache.fetch import download
from inferd.cache.prepare import source_record
from inferd.catalog.catalog import Catalog
from inferd.catalog.schema import ModelEntry
from inferd.errors import CacheError, IntegrityError
from tests.index_server import (
    CONFIG,
    LICENSE,
    MAIN_WHEEL,
    PART_WHEEL,
    WEIGHTS,
    sha,
    tiny_entry,
)
from tests.signing_keys import write_keys
from tests.unit.test_cache import _store


def _with_main_wheel(hashes: dict[str, str], package: str, filename: str) -> ModelEntry:
    """The tiny entry with its main wheel's package and file name replaced."""
    data = tiny_entry(hashes).model_dump(mode="json")
    source = data["sources"][0]
    source["wheels"][0] |= {"package": package, "filename": filename}
    for f in source["files"]:
        for part in f["parts"]:
            if part["wheel"] == MAIN_WHEEL:
                part["wheel"] = filename
    return ModelEntry.model_validate(data)


def _list_on_index(root: Path, project: str, filename: str, sha256: str) -> None:
    """An index page for `project` that lists `filename`, served as the main wheel's bytes (a
    hostile or mistaken index answers whatever name the catalog asks for)."""
    (root / project).mkdir(parents=True, exist_ok=True)
    page = {
        "meta": {"api-version": "1.0"},
        "name": project,
        "files": [{"filename": filename, "url": f"../{MAIN_WHEEL}", "hashes": {"sha256": sha256}}],
    }
    (root / project / "index.html").write_text(json.dumps(page))


@pytest.mark.parametrize(
    "filename",
    ["../../evil.whl", "sub/tiny_model-1.0-py3-none-any.whl", "tiny_model.whl", "..whl"],
)
def test_wheel_file_name_from_the_catalog_is_checked_before_use(
    tmp_path: Path, index: tuple[str, dict[str, str]], filename: str
) -> None:
    url, hashes = index
    _list_on_index(tmp_path / "index", "evil", filename, hashes[MAIN_WHEEL])
    entry = _with_main_wheel({**hashes, filename: hashes[MAIN_WHEEL]}, "evil", filename)
    store = _store(tmp_path)
    with pytest.raises(CacheError, match="not a valid wheel file name") as info:
        prepare(entry, entry.profiles[0], store, index_url=url)
    assert filename in str(info.value)
    assert not list(store.root.rglob("*.whl"))
    assert not (store.root / "evil.whl").exists()


def test_package_name_from_the_catalog_is_checked_before_use(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    url, hashes = index
    entry = _with_main_wheel(hashes, "../tiny-model", MAIN_WHEEL)
    with pytest.raises(CacheError, match="not a valid package name"):
        prepare(entry, entry.profiles[0], _store(tmp_path), index_url=url)


def test_download_with_the_wrong_hash_leaves_nothing_at_its_path(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    url, hashes = index
    dest = tmp_path / "dl" / MAIN_WHEEL
    dest.parent.mkdir()
    with pytest.raises(IntegrityError, match="differs from the catalog"):
        download(f"{url}/{MAIN_WHEEL}", dest, "0" * 64)
    assert not list(dest.parent.iterdir())
    download(f"{url}/{MAIN_WHEEL}", dest, hashes[MAIN_WHEEL])
    assert sha(dest.read_bytes()) == hashes[MAIN_WHEEL]
    assert list(dest.parent.iterdir()) == [dest]


def test_blob_is_never_written_through_a_shared_partial_name(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    """`<hex>.partial` was one name for every writer of a blob: a second writer (or a link left
    there) got the bytes, and the first renamed what it had not verified into place."""
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes(b"someone else's file")
    store.blob(sha(WEIGHTS)).with_name(f"{sha(WEIGHTS)}.partial").symlink_to(outside)
    prepare(entry, entry.profiles[0], store, index_url=url)
    assert outside.read_bytes() == b"someone else's file"
    blob = store.blob(sha(WEIGHTS))
    assert not blob.is_symlink() and blob.read_bytes() == WEIGHTS


def test_garbage_collection_removes_leftover_partials(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    """A killed run leaves its own `<hex>.<random>.partial`; under the exclusive blobs lock no
    writer is alive, so it goes, even when the blob itself is wanted."""
    url, hashes = index
    entry, store = tiny_entry(hashes), _store(tmp_path)
    prepare(entry, entry.profiles[0], store, index_url=url)
    leftover = store.blob(sha(WEIGHTS)).with_name(f"{sha(WEIGHTS)}.0123abcd.partial")
    leftover.write_bytes(b"half")
    assert store.collect_garbage() == [leftover]
    assert store.blob(sha(WEIGHTS)).read_bytes() == WEIGHTS


def test_wheel_member_larger_than_the_catalog_says_is_refused(
    tmp_path: Path, index: tuple[str, dict[str, str]]
) -> None:
    """Extraction stops at the catalog's size instead of writing whatever a member expands to."""
    url, hashes = index
    data = tiny_entry(hashes).model_dump(mode="json")
    data["sources"][0]["files"][0]["size"] = 4096
    entry, store = ModelEntry.model_validate(data), _store(tmp_path)
    with pytest.raises(IntegrityError, match=r"tiny\.gguf.*4096"):
        prepare(entry, entry.profiles[0], store, index_url=url)
    assert not list((store.root / "blobs" / "sha256").iterdir())


# Importing converted folders: the tiny model with a Q8_0 profile made from its Q4_1 file.

# The module (`inferd.cache.prepare` as an attribute is the function of that name).
PREPARE = importlib.import_module("inferd.cache.prepare")

HASHES = {MAIN_WHEEL: "a" * 64, PART_WHEEL: "b" * 64}
CONVERTED = "gguf-q8_0"
OUTPUT = "tiny.Q8_0.gguf"


def _converted_entry() -> ModelEntry:
    data = tiny_entry(HASHES).model_dump(mode="json")
    data["profiles"].append(
        data["profiles"][0] | {"id": "q8", "precision": "q8_0", "engine": "llamacpp"}
    )
    return ModelEntry.model_validate(data)


def _derived(gguf: bytes) -> bytes:
    return b"Q8" + gguf[::-1]


@pytest.fixture
def converter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """llama-quantize stood in by a deterministic function of its input; returns its calls."""
    calls: list[str] = []

    def requantize(gguf: Path, out: Path, precision: str, *a: Any, **k: Any) -> dict[str, Any]:
        calls.append(precision)
        out.write_bytes(_derived(gguf.read_bytes()))
        return {"tool": "llama-quantize", "type": precision.upper()}

    monkeypatch.setattr(PREPARE, "run_requantize", requantize)
    return calls


def _provenance(entry: ModelEntry, outputs: dict[str, bytes]) -> dict[str, Any]:
    return {
        "model": "tiny",
        "variant": CONVERTED,
        "source": source_record(entry.sources[0]),
        "license_file": "LICENSE",
        "conversion": {"tool": "llama-quantize", "type": "Q8_0"},
        "outputs": {name: sha(data) for name, data in outputs.items()},
    }


def _converted_archive(
    path: Path,
    outputs: dict[str, bytes],
    *,
    blobs: bool = True,
    signature: bytes | None = None,
) -> dict[str, Any]:
    entry = _converted_entry()
    provenance = _provenance(entry, outputs)
    sources = [WEIGHTS, CONFIG, LICENSE] if blobs else []
    manifest = {
        "format": "inferd-cache-export/1",
        "model": "tiny",
        "folders": [{"variant": CONVERTED, "provenance": provenance}],
        "blobs": [sha(b) for b in sources],
    }
    members = {"manifest.json": json.dumps(manifest).encode()}
    members |= {f"models/tiny/{CONVERTED}/{n}": d for n, d in outputs.items()}
    members[f"models/tiny/{CONVERTED}/provenance.json"] = _record_bytes(provenance)
    if signature is not None:
        members[f"models/tiny/{CONVERTED}.sig"] = signature
    members |= {f"blobs/sha256/{sha(b)}": b for b in sources}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return provenance


def _record_bytes(provenance: dict[str, Any]) -> bytes:
    return (json.dumps(provenance, indent=2) + "\n").encode()


def test_converted_folder_that_rederives_here_is_imported(
    tmp_path: Path, converter: list[str]
) -> None:
    store, archive = _store(tmp_path), tmp_path / "q8.tar"
    _converted_archive(archive, {OUTPUT: _derived(WEIGHTS), "LICENSE": LICENSE})
    import_(archive, store, Catalog([_converted_entry()]))
    assert converter == ["q8_0"]
    folder = store.model_dir("tiny", CONVERTED)
    assert (folder / OUTPUT).read_bytes() == _derived(WEIGHTS)
    assert store.blob(sha(WEIGHTS)).read_bytes() == WEIGHTS


def test_converted_folder_that_differs_from_its_rederivation_is_refused(
    tmp_path: Path, converter: list[str]
) -> None:
    """Its provenance names the catalog's sources, but its output is not what they make."""
    store, archive = _store(tmp_path), tmp_path / "q8.tar"
    _converted_archive(archive, {OUTPUT: b"GGUF evil", "LICENSE": LICENSE})
    with pytest.raises(IntegrityError, match=rf"{CONVERTED}/{OUTPUT}.*re-deriv"):
        import_(archive, store, Catalog([_converted_entry()]))
    assert not list(store.root.glob("models/*/*"))
    assert not list(store.root.glob("blobs/sha256/*"))


def test_unsigned_converted_folder_that_cannot_be_rederived_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No converter here (llama-quantize is not installed) and no signature: nothing vouches."""

    def missing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise CacheError("llama-quantize is not installed")

    monkeypatch.setattr(PREPARE, "run_requantize", missing)
    store, archive = _store(tmp_path), tmp_path / "q8.tar"
    _converted_archive(archive, {OUTPUT: _derived(WEIGHTS), "LICENSE": LICENSE})
    with pytest.raises(CacheError, match=r"llama-quantize is not installed.*sign"):
        import_(archive, store, Catalog([_converted_entry()]))
    assert not list(store.root.glob("models/*/*"))


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keys(tmp_path)


def _signed(tmp_path: Path, outputs: dict[str, bytes], private: Path) -> bytes:
    """The signature the exporting machine made over its folder (`inferd cache sign`)."""
    from inferd.cache import signing

    folder = tmp_path / "exporter" / CONVERTED
    folder.mkdir(parents=True)
    for name, data in outputs.items():
        (folder / name).write_bytes(data)
    (folder / "provenance.json").write_bytes(
        _record_bytes(_provenance(_converted_entry(), outputs))
    )
    return signing.sign(folder, private).read_bytes()


def test_signed_converted_folder_is_imported_without_rederiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("model_signing")
    monkeypatch.setattr(PREPARE, "run_requantize", pytest.fail)
    private, public = _keys(tmp_path)
    outputs = {OUTPUT: b"GGUF made elsewhere", "LICENSE": LICENSE}
    signature = _signed(tmp_path, outputs, private)
    store, archive = _store(tmp_path), tmp_path / "q8.tar"
    _converted_archive(archive, outputs, blobs=False, signature=signature)
    import_(archive, store, Catalog([_converted_entry()]), public_key=public)
    folder = store.model_dir("tiny", CONVERTED)
    assert (folder / OUTPUT).read_bytes() == b"GGUF made elsewhere"
    assert (folder.parent / f"{CONVERTED}.sig").read_bytes() == signature

    # The same signature over other bytes does not verify.
    other = _store(tmp_path / "other")
    tampered = tmp_path / "tampered.tar"
    _converted_archive(
        tampered, {**outputs, OUTPUT: b"GGUF evil"}, blobs=False, signature=signature
    )
    with pytest.raises(IntegrityError, match="signature"):
        import_(tampered, other, Catalog([_converted_entry()]), public_key=public)
    assert not list(other.root.glob("models/*/*"))


def test_converted_folder_holding_the_source_files_is_refused(
    tmp_path: Path, converter: list[str]
) -> None:
    """Every file is the catalog's, but this folder is the Q8_0 one: only re-deriving shows
    it is the shipped Q4_1 file under the converted folder's name."""
    store, archive = _store(tmp_path), tmp_path / "q8.tar"
    _converted_archive(archive, {"tiny.gguf": WEIGHTS, "LICENSE": LICENSE})
    with pytest.raises(IntegrityError, match=r"tiny\.gguf.*re-deriv"):
        import_(archive, store, Catalog([_converted_entry()]))
    assert not list(store.root.glob("models/*/*"))
