"""`inferd cache import` against hostile archives, built here with tarfile: a forged provenance,
blobs and folders the catalog does not vouch for, sparse members, compressed bombs, too many
members and an oversized manifest. Each is refused with one line naming the member and the
reason, and nothing reaches the cache's blobs or model folders."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferd.cache.prepare import source_record
from inferd.cli.main import main
from tests.index_server import CONFIG, LICENSE, MAIN_WHEEL, PART_WHEEL, WEIGHTS, sha, tiny_entry

HASHES = {MAIN_WHEEL: "a" * 64, PART_WHEEL: "b" * 64}
VARIANT = "gguf-q4_1"  # the tiny entry's as-shipped folder
EVIL = b"GGUF" + b"\xee" * 4096


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalog describing the tiny model (no index needed: nothing is fetched) and an empty
    cache folder to import into."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    entry = tiny_entry(HASHES).model_dump(mode="json", exclude_defaults=True)
    (catalog / "tiny.yaml").write_text(yaml.safe_dump(entry))
    monkeypatch.setenv("INFERD_CATALOG_PATH", str(catalog))
    return tmp_path / "cache"


def _import(capsys: pytest.CaptureFixture[str], archive: Path, cache: Path) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["cache", "import", str(archive), "--cache-path", str(cache)])
    _, err = capsys.readouterr()
    return int(info.value.code or 0), err


def _nothing_written(cache: Path) -> bool:
    return not list(cache.glob("models/*/*")) and not list(cache.glob("blobs/sha256/*"))


def _manifest(folders: list[dict[str, object]], blobs: list[str], **extra: object) -> bytes:
    return json.dumps(
        {"format": "inferd-cache-export/1", "model": "tiny", "folders": folders, "blobs": blobs}
        | extra
    ).encode()


def _provenance(
    outputs: dict[str, bytes], source: dict[str, object] | None = None
) -> dict[str, Any]:
    """What `inferd cache export` writes for the tiny folder, with these files as its outputs."""
    return {
        "model": "tiny",
        "variant": VARIANT,
        "source": source or source_record(tiny_entry(HASHES).sources[0]),
        "license_file": "LICENSE",
        "conversion": {"tool": "none (files as shipped)"},
        "outputs": {name: sha(data) for name, data in outputs.items()},
    }


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _folder_archive(path: Path, outputs: dict[str, bytes], provenance: dict[str, Any]) -> None:
    members = [
        _file("manifest.json", _manifest([{"variant": VARIANT, "provenance": provenance}], []))
    ]
    members += [_file(f"models/tiny/{VARIANT}/{n}", d) for n, d in outputs.items()]
    _write(path, members)


def test_genuine_folder_is_imported(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The baseline the refusals below differ from: the catalog's own files are accepted."""
    outputs = {"tiny.gguf": WEIGHTS, "conf/config.json": CONFIG, "LICENSE": LICENSE}
    archive = tmp_path / "good.tar"
    _folder_archive(archive, outputs, _provenance(outputs))
    code, err = _import(capsys, archive, cache)
    assert code == 0, err
    assert (cache / "models" / "tiny" / VARIANT / "tiny.gguf").read_bytes() == WEIGHTS


def test_forged_provenance_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The catalog's public source record copied, with the archive's own weights and hashes."""
    outputs = {"tiny.gguf": EVIL, "conf/config.json": CONFIG, "LICENSE": LICENSE}
    archive = tmp_path / "forged.tar"
    _folder_archive(archive, outputs, _provenance(outputs))
    code, err = _import(capsys, archive, cache)
    assert code == 1
    assert f"models/tiny/{VARIANT}/tiny.gguf" in err and sha(WEIGHTS) in err
    assert len([line for line in err.splitlines() if line.startswith("inferd:")]) == 1
    assert _nothing_written(cache)


def test_file_the_catalog_does_not_list_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = {
        "tiny.gguf": WEIGHTS,
        "conf/config.json": CONFIG,
        "LICENSE": LICENSE,
        "tokenizer_config.json": b'{"chat_template": "{{ evil }}"}',
    }
    archive = tmp_path / "extra.tar"
    _folder_archive(archive, outputs, _provenance(outputs))
    code, err = _import(capsys, archive, cache)
    assert code == 1
    assert "tokenizer_config.json" in err and "catalog" in err
    assert _nothing_written(cache)


def test_folder_missing_a_catalog_file_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Consistent with its own provenance, but not the folder the catalog describes."""
    outputs = {"tiny.gguf": WEIGHTS, "LICENSE": LICENSE}
    archive = tmp_path / "partial.tar"
    _folder_archive(archive, outputs, _provenance(outputs))
    code, err = _import(capsys, archive, cache)
    assert code == 1
    assert "conf/config.json" in err and "catalog" in err
    assert _nothing_written(cache)


def test_provenance_with_other_source_hashes_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A self-consistent record (its source names the evil file's hash): not the catalog's."""
    outputs = {"tiny.gguf": EVIL, "conf/config.json": CONFIG, "LICENSE": LICENSE}
    source = source_record(tiny_entry(HASHES).sources[0])
    source["files"] = {**source["files"], "tiny.gguf": sha(EVIL)}
    archive = tmp_path / "other-source.tar"
    _folder_archive(archive, outputs, _provenance(outputs, source))
    code, err = _import(capsys, archive, cache)
    assert code == 1
    assert VARIANT in err and "source" in err and "catalog" in err
    assert _nothing_written(cache)


def test_blob_the_catalog_does_not_list_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blob that hashes to its own name, but that no source of the model lists."""
    archive = tmp_path / "blob.tar"
    name = f"blobs/sha256/{sha(EVIL)}"
    _write(archive, [_file("manifest.json", _manifest([], [sha(EVIL)])), _file(name, EVIL)])
    code, err = _import(capsys, archive, cache)
    assert code == 1
    assert sha(EVIL) in err and "catalog" in err
    assert _nothing_written(cache)


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _gnu_sparse(name: str, stored: bytes, realsize: int) -> bytes:
    """An old-GNU sparse member ('S'): `stored` at the end of a hole, `realsize` in all.
    tarfile cannot write one, so its sparse map is written into the header by hand."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))

    def octal(value: int) -> bytes:
        return f"{value:011o}".encode() + b"\0"

    header[386:398] = octal(realsize - len(stored))  # the one data region: its offset
    header[398:410] = octal(len(stored))  # and its length
    header[483:495] = octal(realsize)
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header) + _padded(stored)


def _pax_sparse(name: str, stored: bytes, realsize: int) -> bytes:
    """A GNU 0.1 sparse member described in PAX headers."""
    info = tarfile.TarInfo(name)
    info.size = len(stored)
    info.pax_headers = {
        "GNU.sparse.size": str(realsize),
        "GNU.sparse.map": f"{realsize - len(stored)},{len(stored)}",
    }
    return _header(info) + _padded(stored)


@pytest.mark.parametrize("make", [_gnu_sparse, _pax_sparse], ids=["gnu", "pax"])
def test_sparse_member_is_refused(
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[str, bytes, int], bytes],
) -> None:
    """A sparse member expands holes the archive does not hold: refused, never extracted."""
    archive = tmp_path / "sparse.tar"
    manifest, _ = _file("manifest.json", _manifest([], []))
    archive.write_bytes(
        _header(manifest)
        + _padded(_manifest([], []))
        + make(f"models/tiny/{VARIANT}/holes", b"x" * 512, 8 << 20)
        + bytes(2 * tarfile.BLOCKSIZE)
    )
    with tarfile.open(archive) as tar:  # what tarfile reads: a sparse member
        assert tar.getmember(f"models/tiny/{VARIANT}/holes").issparse()
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert f"models/tiny/{VARIANT}/holes" in err and "sparse" in err
    assert _nothing_written(cache)
    assert not list((cache / "tmp").rglob("holes"))


GENUINE = {"tiny.gguf": WEIGHTS, "conf/config.json": CONFIG, "LICENSE": LICENSE}


def _listed(extra: dict[str, str] | None = None) -> list[dict[str, object]]:
    """The manifest's folders: the genuine one, its outputs with `extra` (name: sha256) added,
    so an archive is whole and consistent and only the bound can refuse it."""
    provenance = _provenance(GENUINE)
    provenance["outputs"] |= extra or {}
    return [{"variant": VARIANT, "provenance": provenance}]


def _genuine_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_file(f"models/tiny/{VARIANT}/{n}", d) for n, d in GENUINE.items()]


def _zeros_gz(path: Path, size: int) -> None:
    """A gzip'd export whose folder also holds `zeros`, `size` zero bytes: a few hundred KiB
    on disk. Written through zlib a MiB at a time, so the test never holds `size` bytes."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: a gzip stream
    zeros, digest = bytes(1 << 20), hashlib.sha256()
    for _ in range(size >> 20):
        digest.update(zeros)
    info = tarfile.TarInfo(f"models/tiny/{VARIANT}/zeros")
    info.size = size
    members = [_file("manifest.json", _manifest(_listed({"zeros": digest.hexdigest()}), []))]
    with path.open("wb") as out:
        for head, data in [*members, *_genuine_members()]:
            out.write(compressor.compress(head.tobuf(tarfile.GNU_FORMAT) + _padded(data)))
        out.write(compressor.compress(info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(size >> 20):
            out.write(compressor.compress(zeros))
        out.write(compressor.compress(bytes(2 * tarfile.BLOCKSIZE)))  # end of archive
        out.write(compressor.flush())


def test_compressed_bomb_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gzip'd member that expands far beyond anything the tiny model's export could hold
    (its sources are 1 MB): refused from its header, before its bytes are written."""
    archive = tmp_path / "bomb.tar.gz"
    _zeros_gz(archive, 128 << 20)
    assert archive.stat().st_size < 1 << 20
    with gzip.open(archive) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        assert tar.next() is not None  # a real tar.gz, readable as one
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert f"models/tiny/{VARIANT}/zeros" in err and "bound" in err
    assert _nothing_written(cache)


def test_archive_of_many_members_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Many empty members: each costs a file and memory however small the archive."""
    archive = tmp_path / "many.tar.gz"
    empty = {f"f{i}": sha(b"") for i in range(5000)}
    members = [_file("manifest.json", _manifest(_listed(empty), [])), *_genuine_members()]
    members += [_file(f"models/tiny/{VARIANT}/{name}", b"") for name in empty]
    _write(archive, members, "w:gz")
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert "members" in err and "bound" in err
    assert _nothing_written(cache)


def test_xz_stream_asking_for_gigabytes_of_memory_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An xz header chooses the decoder's dictionary; this one asks for 4 GiB (its block
    header's dictionary byte patched, and its CRC with it)."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for info, data in [_file("manifest.json", _manifest(_listed(), [])), *_genuine_members()]:
            tar.addfile(info, io.BytesIO(data))
    xz = bytearray(lzma.compress(plain.getvalue(), format=lzma.FORMAT_XZ, preset=0))
    block = (xz[12] + 1) * 4  # the block header follows the 12-byte stream header
    assert xz[14:16] == b"\x21\x01"  # one filter, LZMA2, one property byte: the dictionary
    xz[16] = 40  # 4 GiB - 1
    xz[12 + block - 4 : 12 + block] = struct.pack("<I", zlib.crc32(bytes(xz[12 : 12 + block - 4])))
    assert len(lzma.decompress(bytes(xz))) == len(plain.getvalue())  # valid, unlimited
    archive = tmp_path / "greedy.tar.xz"
    archive.write_bytes(bytes(xz))
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert "memory" in err and "bound" in err
    assert _nothing_written(cache)


def test_oversized_manifest_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest is a few KiB; one of megabytes is refused before it is parsed."""
    archive = tmp_path / "big-manifest.tar"
    _write(archive, [_file("manifest.json", _manifest([], [], padding="x" * (4 << 20)))])
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert "manifest.json" in err and "bound" in err
    assert _nothing_written(cache)


def test_oversized_header_record_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tarfile reads a PAX record whole into memory before the member it describes."""
    archive = tmp_path / "big-header.tar"
    members = [_file("manifest.json", _manifest(_listed(), [])), *_genuine_members()]
    members[-1][0].pax_headers = {"comment": "x" * (4 << 20)}
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    code, err = _import(capsys, archive, cache)
    assert code == 1, err
    assert "header record" in err and "bound" in err
    assert _nothing_written(cache)
