"""A model moved to an offline machine as one file, then served from there.

Export the default model from the test cache, import it into an empty cache, and serve it with
`INFERD_OFFLINE=1` and a package index that does not exist: any fetch would fail the start. The
default profile (llama.cpp, a re-quantized GGUF) is the one pulled, moved and served.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import INFERD, MODEL, cache_path, start

pytestmark = pytest.mark.e2e


def _inferd(*args: str, cache: Path, offline: bool = False) -> None:
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache)}
    if offline:
        env.update(INFERD_OFFLINE="1", INFERD_PYPI_INDEX_URL="http://index.invalid/simple")
    done = subprocess.run(
        [INFERD, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr


def test_export_import_and_serve_offline(tmp_path: Path) -> None:
    _inferd("cache", "pull", MODEL, cache=cache_path())
    archive = tmp_path / "model.tar"
    _inferd("cache", "export", MODEL, str(archive), cache=cache_path())
    offline_cache = tmp_path / "offline-cache"
    _inferd("cache", "import", str(archive), cache=offline_cache, offline=True)
    _inferd("cache", "verify", MODEL, cache=offline_cache, offline=True)

    served = start(
        tmp_path,
        "--offline",
        "--pypi-index-url",
        "http://index.invalid/simple",
        cache=offline_cache,
    )
    try:
        served.wait_ready()
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    finally:
        assert served.stop() == 0
