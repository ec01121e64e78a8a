"""Where engines listen: each engine's flags for a Unix socket (and never a TCP address), the
private folder and its socket paths, and the listener check the supervisor makes."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferd.catalog import Catalog
from inferd.engines import llamacpp
from inferd.engines.base import Engine
from inferd.engines.llamacpp import LlamaCppEngine
from inferd.engines.vllm import VllmEngine
from inferd.errors import ConfigError, EngineStartError
from inferd.server import engine_link
from inferd.server.engine_link import MAX_SOCKET_PATH, RuntimeFolder, listening

SOCKET = Path("/run/user/1000/inferd-m-abcdefgh/engine-1.sock")


def _engine(kind: type[Engine], profile: str, extra: list[str], tmp: Path) -> Engine:
    entry = Catalog.load().get("smollm2-135m-instruct")
    p = entry.profile(profile)
    assert p is not None
    return kind("smollm2-135m-instruct", tmp, p, extra, tmp)


@pytest.fixture
def fake_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "find_binary", lambda: "/bin/llama-server")
    monkeypatch.setattr(llamacpp, "gpu_support", lambda binary, caps=(): "no CUDA")


def _tcp_flags(argv: list[str]) -> list[str]:
    """Flags of a TCP address (a --host that is not a socket path, any --port)."""
    return [
        f"{a} {argv[i + 1]}"
        for i, a in enumerate(argv)
        if a == "--port" or (a == "--host" and not argv[i + 1].endswith(".sock"))
    ]


def test_vllm_listens_on_the_socket_with_uds(tmp_path: Path) -> None:
    argv = _engine(VllmEngine, "vllm-cpu-bf16", [], tmp_path).command(SOCKET).argv
    assert argv[argv.index("--uds") + 1] == str(SOCKET)
    assert _tcp_flags(argv) == [] and "--host" not in argv


@pytest.mark.usefixtures("fake_llama_server")
def test_llama_server_listens_on_the_socket_as_its_host(tmp_path: Path) -> None:
    argv = _engine(LlamaCppEngine, "llamacpp-cpu-q8_0", [], tmp_path).command(SOCKET).argv
    assert argv.count("--host") == 1 and argv[argv.index("--host") + 1] == str(SOCKET)
    assert _tcp_flags(argv) == []
    with pytest.raises(EngineStartError, match=r"ending \.sock"):
        _engine(LlamaCppEngine, "llamacpp-cpu-q8_0", [], tmp_path).command(Path("/r/engine"))


@pytest.mark.parametrize(
    ("kind", "profile"),
    [(VllmEngine, "vllm-cpu-bf16"), (LlamaCppEngine, "llamacpp-cpu-q8_0")],
    ids=["vllm", "llamacpp"],
)
@pytest.mark.parametrize("arg", ["--host", "--port=8001", "--uds"])
def test_pass_through_arguments_may_not_say_where_the_engine_listens(
    kind: type[Engine], profile: str, arg: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=f"{arg.split('=')[0]} is inferd's to set"):
        _engine(kind, profile, ["--seed", "1", arg, "0.0.0.0"], tmp_path)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user runtime folder with a short path (pytest's own are too long for a socket)."""
    base = Path(tempfile.mkdtemp(prefix="rt-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base
    shutil.rmtree(base)


def test_the_runtime_folder_is_private_with_a_new_socket_path_per_start(runtime: Path) -> None:
    folder = RuntimeFolder.create("smollm2-135m-instruct")
    info = folder.path.lstat()
    assert folder.path.parent == runtime  # the user's runtime folder first
    assert folder.path.name.startswith("inferd-smollm2-135m-instruct-")
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    first, second = folder.socket(1), folder.socket(2)
    assert first != second and first.parent == folder.path and first.suffix == ".sock"
    first.touch()
    folder.clear()  # what an earlier start left
    assert not first.exists()
    folder.remove()
    assert not folder.path.exists()


def test_a_socket_path_too_long_for_af_unix_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(engine_link, "runtime_bases", lambda: [deep])
    with pytest.raises(EngineStartError, match=f"at most {MAX_SOCKET_PATH} bytes.*TMPDIR"):
        RuntimeFolder.create("m")
    # The dry run names a path all the same, without making anything.
    assert RuntimeFolder.planned("m").name == "engine-1.sock"
    assert list(deep.iterdir()) == []


def test_an_unusable_runtime_dir_falls_back_to_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    folder = RuntimeFolder.create("m")
    try:
        assert folder.path.parent == tmp_path
    finally:
        folder.remove()


@pytest.fixture
def folder(runtime: Path) -> Iterator[RuntimeFolder]:
    made = RuntimeFolder.create("m")
    yield made
    made.remove()


def test_listening_waits_for_the_socket_then_checks_it_is_the_engines(
    folder: RuntimeFolder,
) -> None:
    path = folder.socket(1)
    assert listening(path, folder, os.getpid()) is False  # not bound yet
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))
        bound.listen()
        os.chmod(path, 0o777)  # noqa: S103 (as an engine under umask 0 would leave it)
        assert listening(path, folder, os.getpid()) is True  # this process holds it
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        # Held by a process outside the engine's tree: nothing may be sent to it.
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with pytest.raises(EngineStartError, match="held by another process"):
                listening(path, folder, other.pid)
        finally:
            other.kill()
            other.wait()


def test_listening_refuses_a_file_that_is_not_a_socket_or_a_folder_opened_up(
    folder: RuntimeFolder,
) -> None:
    path = folder.socket(1)
    path.write_text("not a socket")
    with pytest.raises(EngineStartError, match="not a socket"):
        listening(path, folder, os.getpid())
    os.chmod(folder.path, 0o755)  # noqa: S103 (the mistake checked for)
    with pytest.raises(EngineStartError, match="no longer a private folder"):
        listening(path, folder, os.getpid())
