"""The shipped catalog: every entry loads, its facts agree with its published checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.catalog import Catalog
from inferd.catalog.estimate import kv_bytes_per_token, parameters, weight_bytes
from inferd.catalog.schema import Reference
from inferd.errors import ConfigError, UnknownModelError

CATALOG = Catalog.load()
REQUIRED = {
    "smollm2-135m-instruct",
    "gemma-3-270m",
    "all-minilm-l6-v2",
    "llama-3.1-8b-instruct",
    "llama-3.3-70b-instruct",
    "gemma-2-9b-it",
    "gemma-2-27b-it",
    "phi-3-mini-4k-instruct",
    "phi-3.5-mini-instruct",
    "mistral-7b-instruct-v0.3",
    "mistral-large-instruct-2407",
    "dbrx-instruct",
    "qwen2.5-7b-instruct",
}


def test_catalog_has_the_required_models() -> None:
    assert {e.id for e in CATALOG} >= REQUIRED


@pytest.mark.parametrize("entry", list(CATALOG), ids=lambda e: e.id)
def test_weight_estimate_matches_the_published_checkpoint(entry: object) -> None:
    from inferd.catalog.schema import ModelEntry

    assert isinstance(entry, ModelEntry)
    for source in entry.sources:
        estimate = weight_bytes(entry.architecture, source.precision)
        published = source.size_bytes
        assert abs(estimate - published) / published < 0.10, (source.id, estimate, published)
    # The parameter count the entry states agrees with its architecture too.
    assert abs(parameters(entry.architecture) - entry.parameters) / entry.parameters < 0.05


def test_known_parameter_counts() -> None:
    # Published totals: 8.03B, 70.6B, 132B (DBRX: 16 experts, all held in memory), 135M.
    assert parameters(CATALOG.get("llama-3.1-8b-instruct").architecture) == pytest.approx(
        8.03e9, rel=0.01
    )
    assert parameters(CATALOG.get("llama-3.3-70b-instruct").architecture) == pytest.approx(
        70.6e9, rel=0.01
    )
    assert parameters(CATALOG.get("dbrx-instruct").architecture) == pytest.approx(132e9, rel=0.01)
    assert parameters(CATALOG.get("smollm2-135m-instruct").architecture) == 134_515_008


def test_kv_cache_per_token() -> None:
    # Llama 3.1 8B: 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token.
    assert kv_bytes_per_token(CATALOG.get("llama-3.1-8b-instruct").architecture, "bf16") == 131072
    assert kv_bytes_per_token(CATALOG.get("llama-3.1-8b-instruct").architecture, "fp8") == 65536


def test_pypi_sources_have_hashes_and_hub_sources_pin_a_repo() -> None:
    for entry in CATALOG:
        for source in entry.sources:
            if source.kind == "pypi":
                assert source.wheels and all(f.sha256 for f in source.files)
            else:
                assert source.repo and source.revision and source.total_bytes


def test_unknown_model_lists_what_exists() -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        CATALOG.get("llama-9000")


def test_bad_yaml_names_file_and_field(tmp_path: Path) -> None:
    good = Path(__file__).parents[2] / "src/inferd/catalog/models/smollm2-135m-instruct.yaml"
    (tmp_path / "broken.yaml").write_text(good.read_text().replace("layers: 30", "layers: many"))
    with pytest.raises(ConfigError) as info:
        Catalog.load(tmp_path)
    assert "broken.yaml" in str(info.value)
    assert "architecture.layers" in str(info.value)


def test_unparsable_yaml_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("id: x\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*line"):
        Catalog.load(tmp_path)


def test_file_paths_cannot_escape_the_model_folder(tmp_path: Path) -> None:
    good = Path(__file__).parents[2] / "src/inferd/catalog/models/smollm2-135m-instruct.yaml"
    text = good.read_text().replace("- path: LICENSE", "- path: ../../LICENSE")
    (tmp_path / "escape.yaml").write_text(text)
    with pytest.raises(ConfigError, match="relative path inside"):
        Catalog.load(tmp_path)


def test_the_reference_figures_are_those_of_a_machine_with_the_same_features() -> None:
    vllm = Catalog.load().get("smollm2-135m-instruct").profile("vllm-cpu-bf16")
    assert vllm is not None
    zen4 = vllm.reference_for(frozenset({"avx2", "avx512f", "avx512_bf16", "fma"}))
    zen3 = vllm.reference_for(frozenset({"avx2", "fma", "f16c"}))
    assert zen4 is not None and "Zen 4" in zen4.machine
    assert zen3 is not None and "Zen 3" in zen3.machine
    # Without AVX512-BF16 vLLM's bf16 steps grow with the batch; with it they stay nearly flat.
    assert zen3.step_ms[16] > 5 * zen3.step_ms[1] and zen4.step_ms[16] < 2 * zen4.step_ms[1]
    # A machine like neither (no AVX2 listed): the least capable figures, the last.
    assert vllm.reference_for(frozenset()) is vllm.references[-1]
    with pytest.raises(ValueError, match="unknown CPU features"):
        Reference(machine="m", cpu_features=("avx513",), prompt_ms={1: 1.0}, step_ms={1: 1.0})
