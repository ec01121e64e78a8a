"""LoRA adapters in the cache like models (issue 17), through the real CLI and `inferd serve`.

The real adapter (tests/adapters/train_lora.py) is served once on llama.cpp from one cache,
which converts it to a GGUF LoRA there; `inferd cache list` shows it with its base model, `cache
sign` signs it, `cache export` writes it into one file; a tampered copy of that file is refused
by `cache import` with one line; the file imported into a second cache lands in its adapter
folder too, and a service there with INFERD_REQUIRE_SIGNED serves it without converting it again
(the same cached folder, byte for byte, and the same answers), while refusing, with their
reasons, an unsigned adapter and one signed by another key. llama.cpp only: the converted GGUF
is what moving an adapter saves, and the suite's time is short.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.adapters import train_lora
from tests.e2e.conftest import (
    LLAMACPP_PROFILE,
    MODEL,
    Served,
    cache_with_model,
    cli,
    start,
)
from tests.e2e.test_adapters import base_folder
from tests.signing_keys import write_keys

pytestmark = pytest.mark.e2e
ADAPTER = train_lora.ADAPTER_NAME
PROMPTS = [prompt for prompt, _ in train_lora.held_out(3)]


@pytest.fixture(scope="module")
def adapter() -> Path:
    return train_lora.cached_adapter(base_folder())


def _error(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The CLI's error lines (progress bars share stderr)."""
    return [line for line in done.stderr.splitlines() if line.startswith("inferd:")]


@contextlib.contextmanager
def _serving(cache: Path, tmp: Path, *args: str) -> Iterator[Served]:
    served = start(tmp, "--profile", LLAMACPP_PROFILE, *args, cache=cache)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def _answers(served: Served, model: str = ADAPTER, prompts: list[str] = PROMPTS) -> list[str]:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    return [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
        )
        .choices[0]
        .message.content
        or ""
        for prompt in prompts
    ]


def _tampered(archive: Path, out: Path, suffix: str) -> Path:
    """A copy of `archive` with one byte changed in the middle of the member ending `suffix`."""
    with tarfile.open(archive) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            fh = src.extractfile(member)
            data = bytearray(fh.read() if fh else b"")
            if member.name.endswith(suffix):
                data[len(data) // 2] ^= 0xFF
            dst.addfile(member, io.BytesIO(bytes(data)))
    return out


def test_an_adapter_moves_signed_to_another_cache_and_is_served_there_as_it_was(
    adapter: Path, tmp_path: Path
) -> None:
    private, public = write_keys(tmp_path, "site")
    other_private, _ = write_keys(tmp_path, "other")
    a, b = cache_with_model(tmp_path / "a"), cache_with_model(tmp_path / "b")
    lora_a, lora_b = tmp_path / "lora-a", tmp_path / "lora-b"
    for name in (ADAPTER, "other-key"):
        shutil.copytree(adapter, lora_a / name)

    # Served once here: converted to GGUF into cache a.
    with _serving(a, tmp_path, "--lora-path", str(lora_a)) as served:
        before = _answers(served)
    assert all(train_lora.parse_label(reply) for reply in before), before  # the adapter's format
    listed = json.loads(cli(a, "cache", "list", "--json").stdout)["adapters"]
    assert {(x["adapter"], x["base"], x["gguf"], x["signed"]) for x in listed} == {
        (ADAPTER, MODEL, True, False),
        ("other-key", MODEL, True, False),
    }

    # Signed (one by another key) and exported.
    for name, key in ((ADAPTER, private), ("other-key", other_private)):
        done = cli(a, "cache", "sign", name, "--key", str(key))
        assert done.returncode == 0 and done.stdout.startswith(f"signed adapter {name}"), done
        done = cli(a, "cache", "export", name, str(tmp_path / f"{name}.tar"))
        assert done.returncode == 0 and "PEFT + GGUF, signed" in done.stdout, done.stderr

    # A tampered file: one line, nothing imported.
    bad = _tampered(tmp_path / f"{ADAPTER}.tar", tmp_path / "bad.tar", "/adapter.gguf")
    done = cli(b, "cache", "import", str(bad), "--lora-path", str(tmp_path))
    assert done.returncode == 1 and len(_error(done)) == 1, done.stderr
    assert "adapter.gguf missing or altered" in _error(done)[0]
    assert not (b / "adapters").exists() and not (tmp_path / ADAPTER).exists()

    # Imported into cache b and its adapter folder; beside them an adapter never signed here.
    lora_b.mkdir()
    done = cli(b, "cache", "import", str(tmp_path / f"{ADAPTER}.tar"),
                "--lora-path", str(lora_b), "--signing-public-key", str(public))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "signature verified" in done.stdout and f"placed at {lora_b / ADAPTER}" in done.stdout
    done = cli(b, "cache", "import", str(tmp_path / "other-key.tar"), "--lora-path", str(lora_b))
    assert done.returncode == 0 and "not checked here" in done.stdout, done.stderr
    shutil.copytree(adapter, lora_b / "unsigned")
    done = cli(b, "cache", "sign", MODEL, "--key", str(private), "--profile", LLAMACPP_PROFILE)
    assert done.returncode == 0, done.stderr

    # Served there, signatures required: the signed adapter as it was, the others refused.
    args = ("--lora-path", str(lora_b), "--require-signed", "--signing-public-key", str(public))
    with _serving(b, tmp_path, *args) as served:
        models = {m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]}
        assert models == {MODEL, ADAPTER}
        meta = httpx.get(served.url + "/v1/metadata").json()["adapters"]
        refused = {r["id"]: r["reason"] for r in meta["refused"]}
        assert "not signed" in refused["unsigned"], refused
        assert "does not verify" in refused["other-key"], refused
        assert _answers(served) == before
        assert _answers(served, MODEL, PROMPTS[:1]) != before[:1]  # the base model, without it
    folder = next(p for p in (a / "adapters" / MODEL).glob(f"{ADAPTER}-*") if p.is_dir()).name
    # Not converted again: the cached folder is the one made in cache a, record and all.
    for name in ("provenance.json", "adapter.gguf"):
        there = (b / "adapters" / MODEL / folder / name).read_bytes()
        assert there == (a / "adapters" / MODEL / folder / name).read_bytes()
