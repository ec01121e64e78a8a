"""The vLLM engine: its command line follows the profile, and the request fields inferd lets
through are exactly those the installed vLLM reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferd.catalog import Catalog
from inferd.engines.vllm import ACCEPTED_PARAMS, VllmEngine


def _engine(model: str, profile: str, context: int | None = None) -> VllmEngine:
    entry = Catalog.load().get(model)
    p = entry.profile(profile)
    assert p is not None
    return VllmEngine(entry.id, Path("/models/x"), p, ["--seed", "1"], Path("/cache"), context)


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}


def test_cpu_profile_command() -> None:
    cmd = _engine("smollm2-135m-instruct", "vllm-cpu-bf16").command(Path("/r/engine-1.sock"))
    flags = _flags(cmd.argv)
    assert cmd.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--max-model-len"] == "8192"
    assert flags["--dtype"] == "bfloat16"
    assert flags["--kv-cache-memory-bytes"] == "2147483648"
    assert "--tensor-parallel-size" not in flags
    assert cmd.argv[-2:] == ["--seed", "1"]  # pass-through last: it wins
    assert cmd.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert cmd.env["VLLM_CACHE_ROOT"] == "/cache"
    assert cmd.env["HF_HUB_OFFLINE"] == "1"


def test_gpu_fp8_profile_command() -> None:
    cmd = _engine("llama-3.3-70b-instruct", "vllm-hopper-fp8-tp1", context=16384)
    flags = _flags(cmd.command(Path("/r/engine-1.sock")).argv)
    assert flags["--quantization"] == "fp8"
    assert flags["--kv-cache-dtype"] == "fp8"
    assert flags["--max-model-len"] == "16384"
    assert flags["--tensor-parallel-size"] == "1"
    assert flags["--gpu-memory-utilization"] == "0.9"


def test_accepted_fields_match_the_installed_vllm() -> None:
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    completion = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    tokenize = pytest.importorskip("vllm.entrypoints.serve.tokenize.protocol")

    def fields(model: Any) -> set[str]:
        return {name for name in model.model_fields if not name.startswith("_")}

    assert ACCEPTED_PARAMS["/v1/chat/completions"] == fields(chat.ChatCompletionRequest)
    assert ACCEPTED_PARAMS["/v1/completions"] == fields(completion.CompletionRequest)
    assert ACCEPTED_PARAMS["/tokenize"] == (
        fields(tokenize.TokenizeCompletionRequest) | fields(tokenize.TokenizeChatRequest)
    )
    assert ACCEPTED_PARAMS["/detokenize"] == fields(tokenize.DetokenizeRequest)
    embed = pytest.importorskip("vllm.entrypoints.pooling.embed.protocol")
    scoring = pytest.importorskip("vllm.entrypoints.pooling.scoring.protocol")
    assert ACCEPTED_PARAMS["/v1/embeddings"] == fields(embed.EmbeddingCompletionRequest)
    assert ACCEPTED_PARAMS["/rerank"] == fields(scoring.RerankRequest)
