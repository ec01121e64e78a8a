"""Signed models: `inferd cache sign`, `inferd cache verify --signature`, and `inferd serve` with
INFERD_REQUIRE_SIGNED=1 refusing a model that is unsigned, signed by another key, or altered
(weights changed and provenance.json rewritten to match, which the cache's own check accepts).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    INFERD,
    LLAMACPP_PROFILE,
    LLAMACPP_VARIANT,
    MODEL,
    cache_with_model,
    cli,
    free_port,
)
from tests.signing_keys import write_keys


def _keys(folder: Path, name: str) -> tuple[Path, Path]:
    return write_keys(folder, name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of its own holding the default model (copied from the suite's: this test alters
    it), so the shared cache is never touched."""
    return cache_with_model(tmp_path_factory.mktemp("signed-cache"))


def _serve_until_ready_or_exit(cache: Path, public: Path, log: Path) -> tuple[int | None, str]:
    """(exit code, or None once ready and stopped, and the output)."""
    port = free_port()
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache)}
    args = [INFERD, "serve", "--port", str(port), "--profile", LLAMACPP_PROFILE,
            "--require-signed", "--signing-public-key", str(public)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                return proc.returncode, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health/ready").status_code == 200:
                    r = httpx.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        json={"model": MODEL, "max_tokens": 4,
                              "messages": [{"role": "user", "content": "Hi"}]},
                        timeout=60,
                    )  # fmt: skip
                    assert r.status_code == 200, r.text
                    return None, log.read_text()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"neither ready nor exited:\n{log.read_text()[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(60)


def test_signed_models_serve_and_anything_else_is_refused(cache: Path, tmp_path: Path) -> None:
    private, public = _keys(tmp_path, "ours")
    _, stranger = _keys(tmp_path, "theirs")
    folder = cache / "models" / MODEL / LLAMACPP_VARIANT
    select = ("--profile", LLAMACPP_PROFILE)

    # Unsigned: refused, saying so (exit 1, one line at the end of the start-up output).
    code, out = _serve_until_ready_or_exit(cache, public, tmp_path / "unsigned.log")
    assert code == 1 and "is not signed" in out, out[-2000:]

    signed = cli(cache, "cache", "sign", MODEL, *select, "--key", str(private))
    assert signed.returncode == 0, signed.stderr
    signature = folder.parent / f"{LLAMACPP_VARIANT}.sig"
    assert signature.is_file() and str(signature) in signed.stdout

    ok = cli(cache, "cache", "verify", MODEL, *select, "--signature",
              "--signing-public-key", str(public), "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signature"]["verified"] is True
    wrong = cli(cache, "cache", "verify", MODEL, *select, "--signature",
                 "--signing-public-key", str(stranger))  # fmt: skip
    assert wrong.returncode == 1 and "Key mismatch" in wrong.stderr

    # Signed with our key: served.
    code, out = _serve_until_ready_or_exit(cache, public, tmp_path / "signed.log")
    assert code is None and "verified with" in out

    # Altered, with provenance.json rewritten to match: the cache's check passes, the
    # signature does not, and serve refuses.
    weights = folder / "SmolLM2-135M-Instruct.Q8_0.gguf"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    record = json.loads((folder / "provenance.json").read_text())
    record["outputs"][weights.name] = hashlib.sha256(data).hexdigest()
    (folder / "provenance.json").write_text(json.dumps(record))
    assert cli(cache, "cache", "verify", MODEL).returncode == 0  # provenance alone: fooled
    bad = cli(cache, "cache", "verify", MODEL, *select, "--signature",
               "--signing-public-key", str(public))  # fmt: skip
    assert bad.returncode == 1 and f"changed since signing: {weights.name}" in bad.stderr
    code, out = _serve_until_ready_or_exit(cache, public, tmp_path / "altered.log")
    assert code == 1 and f"changed since signing: {weights.name}" in out


def test_require_signed_without_a_key_is_a_usage_error(cache: Path) -> None:
    done = cli(cache, "serve", "--require-signed", "--port", str(free_port()), timeout=60)
    assert done.returncode == 2
    assert "INFERD_SIGNING_PUBLIC_KEY" in done.stderr and len(done.stderr.splitlines()) == 1
