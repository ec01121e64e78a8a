"""CLI mistakes end with one clear line and exit code 2, before any slow work."""

from __future__ import annotations

import os
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


def _catalog_pick_here() -> str:
    """The catalog's one-user profile on this CPU, read from the kernel, not from inferd: Q8_0
    where AMX is missing (its `prefer_when_missing: [amx_tile]`), else the shipped Q4_1 (the
    project's machines have been both: an AMD EPYC, an Intel Xeon with AMX)."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "llamacpp-cpu-q4_1" if "amx_tile" in flags else "llamacpp-cpu-q8_0"


def test_listings_have_json(tmp_path: Path) -> None:
    import json

    # A cache of its own: no `inferd tune` figures of this machine, so the catalog's rules.
    env = {**os.environ, "INFERD_CACHE_PATH": str(tmp_path)}
    models = json.loads(_run("models", "--json", env=env).stdout)
    assert any(m["id"] == "smollm2-135m-instruct" for m in models)
    profiles = json.loads(_run("profiles", "smollm2-135m-instruct", "--json", env=env).stdout)
    # No `inferd tune` figures: the catalog's rules pick llama.cpp's profile for this CPU, run
    # behind the model with vLLM (the CPU default, `cpu-both`).
    assert profiles["selected"] == "cpu-both"
    assert profiles["combined"][0]["engines"][0]["profile"] == _catalog_pick_here()
    assert profiles["profiles"][0]["id"] == "llamacpp-cpu-q4_1"
    assert profiles["by_goal"] == {
        "latency": _catalog_pick_here(),
        "throughput": "vllm-cpu-bf16",
    }
    assert "no --optimize given" in profiles["why"]
    table = _run("profiles", "smollm2-135m-instruct", env=env).stdout
    assert "why: no --optimize given" in table and "--optimize throughput picks" in table
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


def test_dry_run_prints_the_engine_command(tmp_path: Path) -> None:
    import json

    # A cache of its own: no `inferd tune` figures of this machine, so the catalog's rules.
    clean = {**os.environ, "INFERD_CACHE_PATH": str(tmp_path)}
    r = _run("serve", "--dry-run", "--json", env=clean)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    argv = plan["engine"]["argv"]
    assert Path(argv[0]).name == "llama-server"
    assert argv[argv.index("--parallel") + 1] == "4"
    # On a CPU the default runs both engines behind the model: llama.cpp first, vLLM behind it.
    assert plan["profile"]["id"] == "cpu-both"
    engines = [(e["name"], e["profile"]) for e in plan["engines"]]
    assert engines == [("llamacpp", _catalog_pick_here()), ("vllm", "vllm-cpu-bf16")]
    assert plan["engines"][1]["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "no --optimize given" in plan["profile"]["why"]

    r = _run("serve", "--dry-run", "--json", "--optimize", "latency", env=clean)
    plan = json.loads(r.stdout)
    assert plan["profile"]["id"] == _catalog_pick_here() and "engines" not in plan

    r = _run("serve", "--dry-run", "--json", "--optimize", "throughput", env=clean)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    argv = plan["engine"]["argv"]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert plan["profile"]["id"] == "vllm-cpu-bf16"
    assert plan["profile"]["why"].startswith("--optimize throughput")

    env = {**clean, "INFERD_OPTIMIZE": "throughput"}
    r = _run("serve", "--dry-run", "--json", env=env)
    assert json.loads(r.stdout)["profile"]["id"] == "vllm-cpu-bf16"


def test_dry_run_of_several_models_plans_each_and_refuses_what_names_one() -> None:
    import json

    r = _run(
        "serve",
        *("smollm2-135m-instruct", "all-minilm-l6-v2", "--dry-run", "--json"),
        *("--profile", "smollm2-135m-instruct=vllm-cpu-bf16"),
    )
    assert r.returncode == 0, r.stderr
    plans = {p["model"]: p for p in json.loads(r.stdout)["models"]}
    assert plans["smollm2-135m-instruct"]["profile"]["id"] == "vllm-cpu-bf16"
    assert plans["all-minilm-l6-v2"]["engine"]["argv"][-4:-2] == ["--runner", "pooling"]
    env = {**os.environ, "INFERD_MODEL": "smollm2-135m-instruct,all-minilm-l6-v2"}
    r = _run("serve", "--dry-run", "--json", env=env)
    assert len(json.loads(r.stdout)["models"]) == 2
    for args, words in (
        (("--engine-args=--foo",), "--engine-args applies to one model"),
        (("--profile", "nope"), "belongs to none of the models served"),
        (("smollm2-135m-instruct",), "a model is named twice"),
    ):
        r = _run("serve", "smollm2-135m-instruct", "all-minilm-l6-v2", *args)
        assert r.returncode == 2
        assert words in _one_line(r)


def test_non_loopback_bind_without_keys_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "INFERD_API_KEYS_FILE": str(tmp_path / "none.json")}
    r = _run("serve", "--host", "0.0.0.0", "--cache-path", str(tmp_path), env=env)
    assert r.returncode == 2
    assert "--allow-unauthenticated" in _one_line(r)


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    import json

    env = {**os.environ, "INFERD_API_KEYS_FILE": str(tmp_path / "keys.json")}
    created = _run("keys", "create", "ci", "--rpm", "60", env=env)
    assert created.returncode == 0
    key = created.stdout.strip()
    assert key.startswith("inferd-") and key not in (tmp_path / "keys.json").read_text()
    listed = json.loads(_run("keys", "list", "--json", env=env).stdout)["keys"]
    assert [(k["name"], k["rpm"], k["revoked"]) for k in listed] == [("ci", 60, False)]
    assert _run("keys", "revoke", "ci", env=env).returncode == 0
    assert json.loads(_run("keys", "list", "--json", env=env).stdout)["keys"][0]["revoked"]
    again = _run("keys", "revoke", "ci", env=env)
    assert again.returncode == 2 and "no active key" in _one_line(again)
    bad = _run("keys", "create", "x", "--rpm", "0", env=env)
    assert bad.returncode == 2
