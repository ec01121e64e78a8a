"""CLI mistakes end with one clear line and exit code 2, before any slow work."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import INFERD

pytestmark = pytest.mark.e2e


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INFERD, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_model(tmp_path: Path) -> None:
    r = _run("serve", "llama-9000", "--cache-path", str(tmp_path))
    assert r.returncode == 2
    assert "unknown model 'llama-9000'" in _one_line(r)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("serve", "--port", str(port), "--cache-path", str(tmp_path))
    assert r.returncode == 2
    assert f"port {port}" in _one_line(r)


def test_cache_folder_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _run("serve", "--cache-path", str(blocker / "cache"))
    assert r.returncode == 2
    assert "not writable" in _one_line(r)


def test_bad_flag_value() -> None:
    r = _run("serve", "--port", "http")
    assert r.returncode == 2
    assert "--port" in _one_line(r)


def test_unknown_flag() -> None:
    r = _run("serve", "--prot", "8000")
    assert r.returncode == 2
    assert "--prot" in _one_line(r)


def test_listings_have_json() -> None:
    import json

    models = json.loads(_run("models", "--json").stdout)
    assert any(m["id"] == "smollm2-135m-instruct" for m in models)
    profiles = json.loads(_run("profiles", "smollm2-135m-instruct", "--json").stdout)
    assert profiles["selected"] == "vllm-cpu-bf16"
    assert profiles["profiles"][0]["id"] == "vllm-cpu-bf16"
    assert _run("version").stdout.startswith("inferd ")
    assert subprocess.run(
        [sys.executable, "-m", "inferd", "version"], capture_output=True, text=True, check=True
    ).stdout.startswith("inferd ")


H100 = str(Path(__file__).parents[1] / "fixtures" / "hardware" / "h100-sxm")


def test_profiles_on_the_h100_capture_pick_a_single_gpu_vllm_profile() -> None:
    import json

    r = _run("profiles", "llama-3.1-8b-instruct", "--hardware", H100, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["selected"] == "vllm-hopper-fp8-tp1"
    chosen = next(p for p in data["profiles"] if p["id"] == data["selected"])
    assert (chosen["engine"], chosen["tp"], chosen["status"]) == ("vllm", 1, "runnable")
    assert {"id", "engine", "precision", "tp", "status", "reason"} <= set(chosen)
    table = _run("profiles", "llama-3.1-8b-instruct", "--hardware", H100).stdout
    assert "H100" in table and "Runnable here" in table and "vllm-hopper-fp8-tp1" in table


def test_profiles_here_explain_why_no_gpu_profile_fits() -> None:
    import json

    data = json.loads(_run("profiles", "llama-3.1-8b-instruct", "--json").stdout)
    assert data["selected"] is None
    assert all(p["status"] == "incompatible" and "GPU" in p["reason"] for p in data["profiles"])
    r = _run("serve", "llama-3.1-8b-instruct", "--dry-run")
    assert r.returncode == 2
    assert "needs an NVIDIA GPU" in _one_line(r)


def test_dry_run_prints_the_engine_command() -> None:
    import json

    r = _run("serve", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    argv = plan["engine"]["argv"]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert plan["profile"]["id"] == "vllm-cpu-bf16"
