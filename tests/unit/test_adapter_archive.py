"""Adapters in the cache like models (issue 17): `inferd cache list`, `verify`, `sign`, `export`
and `import` for a cached LoRA adapter, and INFERD_REQUIRE_SIGNED when one is served.

Adapters here are small PEFT folders with SmolLM2-135M's shapes (`test_adapters.make_adapter`);
one cached with a stand-in `adapter.gguf` plays one converted for llama.cpp (what matters here is
that the file travels, is hashed, and is not made again on the other side).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from inferd.cache import adapter_archive, adapter_store, signing
from inferd.cache import adapters as adapter_files
from inferd.cache.adapter_store import GGUF, StoredAdapter
from inferd.cache.store import PROVENANCE, ModelStore, hash_tree
from inferd.cli.main import main
from inferd.errors import AdapterError, CacheError, IntegrityError, UsageError
from tests.signing_keys import write_keys
from tests.unit.test_adapters import make_adapter

BASE = "smollm2-135m-instruct"
NAME = "topic"


def _store(root: Path) -> ModelStore:
    store = ModelStore(root)
    store.ensure_writable()
    return store


def _kept(tmp_path: Path, store: ModelStore, *, gguf: bool = True) -> StoredAdapter:
    """The adapter kept in `store` as a llama.cpp service keeps it: PEFT files and a GGUF."""
    spec = adapter_files.read(make_adapter(tmp_path / "src" / NAME))
    kept = adapter_store.keep(spec, BASE, store)
    if gguf:  # what llama.cpp's converter would have added, recorded as keep records it
        (kept.path / GGUF).write_bytes(b"GGUF" + bytes(range(256)) * 64)
        record = json.loads((kept.path / PROVENANCE).read_text())
        record["converted"] = {"script": "convert_lora_to_gguf.py", "outtype": "f16"}
        record["outputs"] = hash_tree(kept.path)
        (kept.path / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return kept


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def _errors(err: str) -> list[str]:
    """The CLI's error lines (progress bars share stderr)."""
    return [line for line in err.splitlines() if line.startswith("inferd:")]


def _rewrite(archive: Path, out: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of `archive` with members replaced (or, for None, left out)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            fh = src.extractfile(member)
            data = fh.read() if fh else b""
            if member.name in change:
                if change[member.name] is None:
                    continue
                data = change[member.name] or b""
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


@pytest.fixture
def exported(tmp_path: Path) -> tuple[StoredAdapter, Path]:
    store = _store(tmp_path / "a")
    kept = _kept(tmp_path, store)
    found = adapter_store.one(store, NAME)
    target = tmp_path / "topic.tar"
    manifest = adapter_archive.export(found, target, store)
    assert (manifest["adapter"], manifest["base"], manifest["signed"]) == (NAME, BASE, False)
    return kept, target


def test_an_adapter_moves_to_another_cache_and_is_served_there_unconverted(
    tmp_path: Path, exported: tuple[StoredAdapter, Path]
) -> None:
    kept, archive = exported
    store = _store(tmp_path / "b")
    lora = tmp_path / "lora"
    lora.mkdir()
    done = adapter_archive.import_(archive, store, lora_path=lora)
    assert done.path == store.root / "adapters" / BASE / kept.path.name
    assert (done.gguf, done.signature, done.placed) == (True, "none", lora / NAME)
    assert hash_tree(done.path) == hash_tree(kept.path)
    assert adapter_store.verify(done.path) == adapter_store.verify(kept.path)
    assert adapter_store.source_hashes(lora / NAME) == adapter_store.source_hashes(kept.path)
    # What a llama.cpp service does with the adapter folder: the imported copy is reused as it
    # is. Without a converter, needing to convert again would raise.
    spec = adapter_files.read(lora / NAME)
    served = adapter_store.keep(spec, BASE, store, gguf_base=tmp_path, converter=None)
    assert served.path == done.path
    assert served.provenance == adapter_store.verify(kept.path)  # not made again
    # Again, the same: the folder is there with the same files; nothing changes.
    again = adapter_archive.import_(archive, store, lora_path=lora)
    assert again.placed == lora / NAME and hash_tree(again.path) == hash_tree(kept.path)


def test_a_tampered_archive_is_refused_and_nothing_is_written(
    tmp_path: Path, exported: tuple[StoredAdapter, Path]
) -> None:
    kept, archive = exported
    member = f"adapters/{BASE}/{kept.path.name}/{GGUF}"
    bad = _rewrite(archive, tmp_path / "bad.tar", {member: b"GGUF" + b"\0" * 100})
    store = _store(tmp_path / "b")
    lora = tmp_path / "lora"
    lora.mkdir()
    with pytest.raises(IntegrityError, match=f"{member} missing or altered"):
        adapter_archive.import_(bad, store, lora_path=lora)
    assert not (store.root / "adapters").exists()  # only staging was written, and removed
    assert not list(lora.iterdir())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"adapters/x/../../etc/passwd": b"x"}, "escape the cache"),
        ({"adapters/other/topic-0123456789abcdef/adapter.gguf": b"x"}, "not part of adapter"),
        ({"{folder}/{provenance}": b"{}"}, "differs from the manifest"),
        ({"{folder}/adapter_model.safetensors": None}, "adapter_model.safetensors missing"),
    ],
)
def test_hostile_members_are_refused(
    tmp_path: Path,
    exported: tuple[StoredAdapter, Path],
    change: dict[str, bytes | None],
    message: str,
) -> None:
    kept, archive = exported
    folder = f"adapters/{BASE}/{kept.path.name}"
    named = {k.format(folder=folder, provenance=PROVENANCE): v for k, v in change.items()}
    with tarfile.open(archive) as tar:
        known = {m.name for m in tar.getmembers()}
    bad = _rewrite(archive, tmp_path / "bad.tar", {k: v for k, v in named.items() if k in known})
    extra = {k: v for k, v in named.items() if k not in known and v is not None}
    if extra:
        with tarfile.open(bad, "a") as tar:
            for name, data in extra.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CacheError, match=message):
        adapter_archive.import_(bad, _store(tmp_path / "b"))
    assert not (tmp_path / "etc").exists()


def test_a_manifest_that_does_not_hold_together_is_refused(
    tmp_path: Path, exported: tuple[StoredAdapter, Path]
) -> None:
    _, archive = exported
    with tarfile.open(archive) as tar:
        fh = tar.extractfile("manifest.json")
        assert fh is not None
        manifest = json.loads(fh.read())
    cases = [
        ({**manifest, "adapter": "../x"}, "invalid adapter id"),
        ({**manifest, "folder": "topic-0000000000000000"}, "another adapter or base model"),
        ({**manifest, "base": "../../tmp"}, "invalid base model id"),
    ]
    forged = json.loads(json.dumps(manifest))
    forged["provenance"]["source"]["files"][adapter_files.CONFIG] = "0" * 64
    cases.append((forged, "give digest"))
    for i, (bad_manifest, message) in enumerate(cases):
        bad = _rewrite(
            archive, tmp_path / f"bad{i}.tar", {"manifest.json": json.dumps(bad_manifest).encode()}
        )
        with pytest.raises(CacheError, match=message):
            adapter_archive.import_(bad, _store(tmp_path / "b"))


def test_a_different_adapter_of_that_id_in_the_folder_is_refused(
    tmp_path: Path, exported: tuple[StoredAdapter, Path]
) -> None:
    _, archive = exported
    lora = tmp_path / "lora"
    make_adapter(lora / NAME, rank=4)
    store = _store(tmp_path / "b")
    with pytest.raises(UsageError, match="holds another adapter of that id"):
        adapter_archive.import_(archive, store, lora_path=lora)
    assert not (store.root / "adapters").exists()


def test_signed_adapters_travel_with_their_signature_and_it_is_checked(
    tmp_path: Path, exported: tuple[StoredAdapter, Path]
) -> None:
    kept, _ = exported
    private, public = write_keys(tmp_path, "site")
    signing.sign(kept.path, private)
    store = _store(tmp_path / "a")
    archive = tmp_path / "signed.tar"
    assert adapter_archive.export(adapter_store.one(store, NAME), archive, store)["signed"]
    done = adapter_archive.import_(archive, _store(tmp_path / "b"), public_key=public)
    assert done.signature == "verified"
    assert signing.signature_path(done.path).is_file()
    assert adapter_archive.import_(archive, _store(tmp_path / "c")).signature == "not checked"
    # The GGUF swapped and every record rewritten to match: the archive's own account holds
    # together, the signature does not.
    folder = f"adapters/{BASE}/{kept.path.name}"
    gguf = b"GGUF evil"
    with tarfile.open(archive) as tar:
        fh = tar.extractfile("manifest.json")
        assert fh is not None
        manifest = json.loads(fh.read())
    manifest["provenance"]["outputs"][GGUF] = hashlib.sha256(gguf).hexdigest()
    record = json.dumps(manifest["provenance"], indent=2).encode() + b"\n"
    forged = _rewrite(
        archive,
        tmp_path / "forged.tar",
        {
            "manifest.json": json.dumps(manifest).encode(),
            f"{folder}/{GGUF}": gguf,
            f"{folder}/{PROVENANCE}": record,
        },
    )
    with pytest.raises(IntegrityError, match="does not verify"):
        adapter_archive.import_(forged, _store(tmp_path / "d"), public_key=public)


def test_require_signed_serves_only_adapters_signed_by_the_key(tmp_path: Path) -> None:
    store = _store(tmp_path / "cache")
    spec = adapter_files.read(make_adapter(tmp_path / "src" / NAME))
    private, public = write_keys(tmp_path, "site")
    with pytest.raises(AdapterError, match=f"adapter {NAME}: not signed .*inferd cache sign"):
        adapter_store.keep(spec, BASE, store, public_key=public)
    kept = adapter_store.keep(spec, BASE, store)
    signing.sign(kept.path, private)
    assert adapter_store.keep(spec, BASE, store, public_key=public).path == kept.path
    _, other = write_keys(tmp_path, "other")
    with pytest.raises(AdapterError, match=f"adapter {NAME}: .*does not verify"):
        adapter_store.keep(spec, BASE, store, public_key=other)


def test_the_cli_lists_verifies_signs_exports_and_imports_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    kept = _kept(tmp_path, _store(a))
    code, out, _ = _cli(capsys, "cache", "list", "--json", "--cache-path", str(a))
    listed = json.loads(out)["adapters"]
    assert code == 0 and [(x["adapter"], x["base"], x["gguf"]) for x in listed] == [
        (NAME, BASE, True)
    ]
    code, out, _ = _cli(capsys, "cache", "list", "--cache-path", str(a))
    assert code == 0 and "LoRA adapters" in out and NAME in out
    private, public = write_keys(tmp_path, "site")
    code, out, _ = _cli(
        capsys, "cache", "sign", NAME, "--key", str(private), "--cache-path", str(a)
    )
    assert code == 0 and out.startswith(f"signed adapter {NAME}")
    code, out, _ = _cli(
        capsys, "cache", "verify", NAME, "--signature",
        "--signing-public-key", str(public), "--cache-path", str(a),
    )  # fmt: skip
    assert code == 0 and "signature" in out and "ok" in out
    archive = tmp_path / "topic.tar"
    code, out, _ = _cli(capsys, "cache", "export", NAME, str(archive), "--cache-path", str(a))
    assert code == 0 and "exported adapter topic" in out and "PEFT + GGUF, signed" in out
    lora = tmp_path / "lora"
    lora.mkdir()
    code, out, _ = _cli(
        capsys, "cache", "import", str(archive), "--cache-path", str(b),
        "--lora-path", str(lora), "--signing-public-key", str(public),
    )  # fmt: skip
    assert code == 0 and "signature verified" in out and f"placed at {lora / NAME}" in out
    # An altered file in the cache: verify names it, exit 1.
    (kept.path / GGUF).write_bytes(b"changed")
    code, out, err = _cli(capsys, "cache", "verify", "--cache-path", str(a))
    assert code == 1 and f"{BASE}/adapter:{kept.path.name}/{GGUF}" in err
    assert len(_errors(err)) == 1
    code, _, err = _cli(
        capsys, "cache", "export", NAME, str(tmp_path / "x.tar"), "--cache-path", str(a)
    )
    assert code == 1 and "missing or altered" in err
    # A tampered archive: one line, nothing imported.
    member = f"adapters/{BASE}/{kept.path.name}/{adapter_files.CONFIG}"
    bad = _rewrite(archive, tmp_path / "bad.tar", {member: b"{}"})
    code, _, err = _cli(capsys, "cache", "import", str(bad), "--cache-path", str(tmp_path / "c"))
    assert code == 1 and len(_errors(err)) == 1 and "refused" in _errors(err)[0]
    code, _, err = _cli(capsys, "cache", "export", "nothing-here", str(tmp_path / "y.tar"))
    assert code == 2 and "nor is it a LoRA adapter in the cache" in err
