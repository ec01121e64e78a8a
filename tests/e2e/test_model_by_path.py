"""Models given by path, served for real: `inferd serve FILE.gguf` on llama.cpp, a Hugging Face
folder on vLLM (the default model's converted folder, and a model of another architecture made
here with random weights), each answering the openai client; and what is refused, in one line
with exit code 2, before anything starts.

The files live at stable paths in the e2e cache (the default model's files as `inferd cache
pull` left them; the tiny Qwen2 model under `by-path/`), so the generated entries and vLLM's
compile cache are reused from run to run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import EAGER, INFERD, MODEL, Served, cache_path, serving
from tests.e2e.hub import Hub

pytestmark = pytest.mark.e2e

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _inferd(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache_path()), **(env or {})}
    return subprocess.run(
        [INFERD, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _pulled(profile: str) -> Path:
    """The default model's folder for `profile`, pulled into the e2e cache if missing."""
    r = _inferd("cache", "pull", MODEL, "--profile", profile, "--json")
    assert r.returncode == 0, r.stderr
    return Path(json.loads(r.stdout)["path"])


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return _pulled("llamacpp-cpu-q4_1") / GGUF_NAME


@pytest.fixture(scope="module")
def converted_folder() -> Path:
    return _pulled("vllm-cpu-bf16")


@pytest.fixture(scope="module")
def tiny_qwen2(converted_folder: Path) -> Path:
    """A Qwen2 model (not the default model's Llama architecture) with random weights, a real
    config, and SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = cache_path() / "by-path" / "Tiny-Qwen2"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(converted_folder / name, folder / name)
    return folder


def _chat(served: Served, model: str, max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == [model]
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=max_tokens,
        temperature=0,
    )


@pytest.fixture(scope="module")
def gguf_server(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(
        tmp_path_factory.mktemp("by-path"), str(gguf_file), "--profile", "llamacpp-cpu-q4_1"
    ) as served:
        yield served


def test_a_gguf_file_is_served_by_path_on_llamacpp(gguf_server: Served, gguf_file: Path) -> None:
    answer = _chat(gguf_server, "smollm2-135m-instruct.q4-1", max_tokens=16)
    text = answer.choices[0].message.content or ""
    assert text.strip()
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 16
    log = gguf_server.log.read_text()
    assert "llamacpp-cpu-q4_1" in log
    # Used in place: the engine's folder links the user's file.
    folder = cache_path() / "models" / "smollm2-135m-instruct.q4-1" / "gguf-q4_1"
    assert (folder / GGUF_NAME).resolve() == gguf_file.resolve()
    provenance = json.loads((folder / "provenance.json").read_text())
    digest = provenance["source"]["files"][GGUF_NAME]
    assert digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_profiles_of_a_catalog_models_file_point_to_the_catalog(gguf_file: Path) -> None:
    r = _inferd("profiles", str(gguf_file), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"] == "smollm2-135m-instruct.q4-1"
    assert f"inferd serve {MODEL}" in report["catalog_match"]
    assert {p["engine"] for p in report["profiles"]} == {"llamacpp", "vllm"}


def test_the_converted_folder_is_served_by_path_on_vllm(
    converted_folder: Path, tmp_path: Path
) -> None:
    name = "smollm2-folder"
    args = (str(converted_folder), "--served-model-name", name, EAGER)
    with serving(tmp_path, *args) as served:
        answer = _chat(served, name)
    assert answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    assert "vllm-cpu-bf16" in served.log.read_text()


def test_a_model_of_another_architecture_is_served_by_path_on_vllm(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    r = _inferd("serve", str(tiny_qwen2), "--dry-run", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (plan["model"], plan["profile"]["id"]) == ("tiny-qwen2", "vllm-cpu-bf16")
    with serving(tmp_path, str(tiny_qwen2), EAGER) as served:
        answer = _chat(served, "tiny-qwen2", max_tokens=8)
    choice = answer.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert isinstance(choice.message.content, str)  # random weights: gibberish, but text
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 3
    assert 1 <= answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def _refusal(*args: str, env: dict[str, str] | None = None) -> str:
    r = _inferd("serve", *args, timeout=120, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_what_is_not_a_servable_model_is_refused_in_one_line(
    tmp_path: Path, tiny_qwen2: Path, gguf_file: Path
) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    assert "not a GGUF file" in _refusal(str(text))
    cut = tmp_path / "cut.gguf"
    with gguf_file.open("rb") as fh:
        cut.write_bytes(fh.read(5_000_000))
    assert "truncated GGUF file" in _refusal(str(cut))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_qwen2, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "no tokenizer" in _refusal(str(no_tokenizer))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_qwen2, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert "no weights" in _refusal(str(no_weights))
    other = tmp_path / "encoder"
    shutil.copytree(tiny_qwen2, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "architecture BertModel is not a text-generation model" in _refusal(str(other))
    # No hub here: "the download ... failed"; with one: "no such repository". Exit 2 either way.
    assert _refusal("hf://inferd-tests/no-such-model@main").startswith(
        "inferd: error: hf://inferd-tests/no-such-model: "
    )


def test_a_hub_model_is_downloaded_once_served_and_kept_for_offline_restarts(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inferd serve hf://ORG/NAME@REVISION` through huggingface_hub's client, against a hub of
    the test's own (tests/e2e/hub.py; no hub is reachable here): a download cut short is never
    served and is resumed by the next start; the model is served on vLLM under the id from its
    name; a restart needs no hub; what the hub does not have is refused by name."""
    repo = "inferd-tests/Tiny-Qwen2"
    cache = tmp_path / "cache"  # its own: the download happens here, every run
    with Hub({repo: tiny_qwen2}) as hub:
        hub_env = {
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),  # no token or cache of the user's
            "INFERD_CACHE_PATH": str(cache),
        }
        for name, value in hub_env.items():
            monkeypatch.setenv(name, value)  # for `serving`, which passes the environment on
        # A file the hub fails: refused in one line, and nothing half-downloaded is kept as done.
        weights = next(n for n in hub.files(repo) if n.endswith(".safetensors"))
        hub.failing.add(weights)
        r = _inferd("serve", f"hf://{repo}@main", timeout=120, env=hub_env)
        last = r.stderr.strip().splitlines()[-1]  # after the download's progress bar
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith(f"inferd: error: hf://{repo}: the download from the Hugging Face")
        folder = cache / "hub" / "inferd-tests--Tiny-Qwen2" / "main"
        assert not (folder / ".inferd-complete").exists()
        hub.failing.clear()

        r = _inferd("serve", f"hf://{repo}@main", "--dry-run", "--json", env=hub_env)
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        assert (plan["model"], plan["profile"]["id"]) == ("tiny-qwen2", "vllm-cpu-bf16")
        for name in (weights, "config.json", "tokenizer.json"):
            assert (folder / name).read_bytes() == (tiny_qwen2 / name).read_bytes()
        assert any("/resolve/" in p and p.endswith(f"/{weights}") for p in hub.seen)

        # Served for real; the start reads the cache, not the hub.
        hub.seen.clear()
        with serving(tmp_path, f"hf://{repo}@main", EAGER, cache=cache) as served:
            answer = _chat(served, "tiny-qwen2", max_tokens=8)
        assert answer.choices[0].finish_reason in ("length", "stop")
        assert hub.seen == []

        # What the hub does not have: refused by name, exit 2.
        assert "no such repository" in _refusal("hf://inferd-tests/nope@main", env=hub_env)
        assert "or revision v9" in _refusal(f"hf://{repo}@v9", env=hub_env)
    # The hub gone: the model is served from the cache, --offline or not.
    for extra in ((), ("--offline",)):
        r = _inferd("serve", f"hf://{repo}@main", *extra, "--dry-run", "--json", env=hub_env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"] == "tiny-qwen2"
    # Another revision was never downloaded: with --offline, refused by name.
    assert "--offline" in _refusal(f"hf://{repo}@v2", "--offline", env=hub_env)
