"""The shipped catalog loads, and profile selection explains every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.catalog import Catalog, profiles
from inferd.catalog.hardware import CPU, Hardware
from inferd.errors import ConfigError, NoProfileError, UnknownModelError

ZEN4 = Hardware(
    CPU("x86_64", "AMD EPYC", 2, frozenset({"avx2", "avx512f", "avx512_bf16"})), 25276510208
)


def test_default_model_entry() -> None:
    entry = Catalog.load().get("smollm2-135m-instruct")
    assert entry.task == "chat"
    assert entry.license == "apache-2.0"
    source = entry.source(entry.profiles[0].source)
    weights = source.file("weights")
    assert weights is not None and weights.path.endswith(".gguf")
    assert source.file("license") is not None
    # bf16 weights: parameters x 2 bytes is the converted checkpoint's size (269,060,552 bytes).
    assert abs(entry.parameters * 2 - 269_060_552) / 269_060_552 < 0.01


def test_unknown_model_lists_what_exists() -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        Catalog.load().get("llama-9000")


def test_default_profile_on_the_dev_machine() -> None:
    entry = Catalog.load().get("smollm2-135m-instruct")
    chosen = profiles.select(entry, ZEN4)
    assert chosen.id == "vllm-cpu-bf16"
    assert chosen.tags == {
        "engine": "vllm",
        "precision": "bf16",
        "hardware": "cpu",
        "optimize": "throughput",
        "format": "safetensors",
    }


def test_no_profile_says_why() -> None:
    entry = Catalog.load().get("smollm2-135m-instruct")
    old = Hardware(CPU("aarch64", "Neoverse", 1, frozenset()), 2 * 2**30)
    with pytest.raises(NoProfileError) as info:
        profiles.select(entry, old)
    message = str(info.value)
    assert "x86_64" in message and "avx512f" in message and "GiB memory" in message


def test_named_profile_must_exist() -> None:
    entry = Catalog.load().get("smollm2-135m-instruct")
    with pytest.raises(NoProfileError, match="has no profile 'fast'"):
        profiles.select(entry, ZEN4, "fast")


def test_broken_catalog_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("id: x\nname: y\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        Catalog.load(tmp_path)
