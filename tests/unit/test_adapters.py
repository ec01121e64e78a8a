"""LoRA adapters (issue 17): an adapter is read without loading weights and checked against its
base model (name, tensor shapes, rank, intact files); refused with the reason otherwise; kept in
the cache with provenance; and each engine is told how to load and apply it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from inferd.cache import adapter_store
from inferd.cache import adapters as adapter_files
from inferd.cache.adapter_store import StoredAdapter
from inferd.cache.store import ModelStore
from inferd.catalog import Catalog
from inferd.catalog.schema import ModelEntry
from inferd.config import load_settings
from inferd.engines.base import Adapter, LoraLimits
from inferd.engines.llamacpp import LlamaCppEngine
from inferd.engines.vllm import VllmEngine
from inferd.errors import AdapterError, ConfigError, IntegrityError
from inferd.observability.metrics import Metrics
from inferd.server.adapters import Adapters, ServedAdapter
from inferd.server.admission import Admission, Limits, Slot
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import Supervisor

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def entry() -> ModelEntry:
    return Catalog.load().get("smollm2-135m-instruct")


def make_adapter(
    folder: Path,
    *,
    base: str = BASE,
    rank: int = 8,
    hidden: int = 576,
    layers: tuple[int, ...] = (0, 29),
    modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    **config: object,
) -> Path:
    """A PEFT-format adapter with SmolLM2-135M's shapes (or others, to be refused)."""
    out = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "down_proj": 576}
    features_in = {"down_proj": 1536, "o_proj": 576}
    folder.mkdir(parents=True)
    tensors = {}
    for layer in layers:
        for module in modules:
            group = "mlp" if module.endswith(("down_proj", "up_proj", "gate_proj")) else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            width = features_in.get(module, hidden)
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((rank, width), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((out.get(module, 576), rank), np.float32)
    save_file(tensors, str(folder / adapter_files.WEIGHTS))
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        **config,
    }
    (folder / adapter_files.CONFIG).write_text(json.dumps(cfg))
    return folder


def refusal(folder: Path, entry: ModelEntry, max_rank: int = 64) -> str:
    with pytest.raises(AdapterError) as caught:
        adapter_files.check(adapter_files.read(folder), entry, max_rank)
    return caught.value.message


def test_an_adapter_for_the_base_model_passes(tmp_path: Path, entry: ModelEntry) -> None:
    spec = adapter_files.read(make_adapter(tmp_path / "topic"))
    adapter_files.check(spec, entry, 64)
    assert (spec.name, spec.rank, spec.alpha) == ("topic", 8, 16.0)
    # A local training path names nothing portable: the shapes decide.
    adapter_files.check(adapter_files.read(make_adapter(tmp_path / "b", base="/x/m")), entry, 64)


def test_another_base_model_is_refused_by_its_config(tmp_path: Path, entry: ModelEntry) -> None:
    folder = make_adapter(tmp_path / "wrong", base="meta-llama/Llama-3.1-8B-Instruct")
    assert "trained for meta-llama/Llama-3.1-8B-Instruct" in refusal(folder, entry)


def test_another_base_model_is_refused_by_its_shapes(tmp_path: Path, entry: ModelEntry) -> None:
    # Named for SmolLM2 (or not at all) but made for a model with another hidden size.
    for base in (BASE, ""):
        folder = make_adapter(tmp_path / f"wide{len(base)}", base=base, hidden=960)
        assert "made for another base model" in refusal(folder, entry)
    folder = make_adapter(tmp_path / "deep", layers=(30,))
    assert "not a layer of smollm2-135m-instruct" in refusal(folder, entry)


def test_a_rank_above_the_limit_is_refused(tmp_path: Path, entry: ModelEntry) -> None:
    folder = make_adapter(tmp_path / "big", rank=128)
    assert "rank 128 is above this service's limit of 64" in refusal(folder, entry)
    adapter_files.check(adapter_files.read(folder), entry, 128)


def test_unsupported_targets_and_variants_are_refused(tmp_path: Path, entry: ModelEntry) -> None:
    folder = make_adapter(tmp_path / "dora", use_dora=True)
    assert "DoRA" in refusal(folder, entry)
    folder = make_adapter(tmp_path / "emb")
    save_file(
        {"base_model.model.lm_head.lora_A.weight": np.zeros((8, 576), np.float32)},
        str(folder / adapter_files.WEIGHTS),
    )
    assert "targets lm_head" in refusal(folder, entry)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or altered"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), "not what its header describes"),
        (lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all"), "broken safetensors"),
        (lambda p: p.write_bytes(b"abc"), "too short"),
        (lambda p: p.unlink(), "adapter_model.safetensors is missing"),
    ],
)
def test_a_broken_weights_file_is_refused(
    tmp_path: Path, entry: ModelEntry, damage: object, reason: str
) -> None:
    folder = make_adapter(tmp_path / "broken")
    damage(folder / adapter_files.WEIGHTS)  # type: ignore[operator]
    with pytest.raises(AdapterError, match=reason):
        adapter_files.read(folder)


def test_a_broken_config_or_name_is_refused(tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "cfg")
    (folder / adapter_files.CONFIG).write_text("{")
    with pytest.raises(AdapterError, match="not valid JSON"):
        adapter_files.read(folder)
    with pytest.raises(AdapterError, match="not a usable model id"):
        adapter_files.read(make_adapter(tmp_path / "bad name"))


def test_the_cache_keeps_a_hashed_copy_and_notices_changes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    store.ensure_writable()
    spec = adapter_files.read(make_adapter(tmp_path / "src" / "topic"))
    kept = adapter_store.keep(spec, "smollm2-135m-instruct", store)
    assert kept.path.parent == tmp_path / "cache" / "adapters" / "smollm2-135m-instruct"
    record = adapter_store.verify(kept.path)
    assert record["source"]["files"] == adapter_store.source_hashes(spec.folder)
    assert set(record["outputs"]) == set(adapter_files.FILES)
    assert adapter_store.keep(spec, "smollm2-135m-instruct", store).path == kept.path  # reused
    (kept.path / adapter_files.CONFIG).write_text("{}")
    with pytest.raises(IntegrityError, match=r"adapter_config\.json"):
        adapter_store.verify(kept.path)
    assert adapter_store.keep(spec, "smollm2-135m-instruct", store).path == kept.path  # rebuilt
    adapter_store.verify(kept.path)


def test_llama_server_loads_adapters_unapplied_and_applies_one_per_request(
    tmp_path: Path, entry: ModelEntry
) -> None:
    profile = entry.profile("llamacpp-cpu-q8_0")
    assert profile is not None
    engine = LlamaCppEngine(entry.id, tmp_path, profile, [], tmp_path / "cache", None)
    assert engine.adapter_flags() == []
    engine.adapters = (
        Adapter("a", tmp_path / "a", tmp_path / "a" / "adapter.gguf"),
        Adapter("b", tmp_path / "b", tmp_path / "b" / "adapter.gguf"),
    )
    assert engine.adapter_flags() == [
        "--lora-init-without-apply",
        "--lora-scaled",
        f"{tmp_path}/a/adapter.gguf:0",
        "--lora-scaled",
        f"{tmp_path}/b/adapter.gguf:0",
    ]
    payload: dict[str, object] = {"model": "b"}
    engine.use_adapter(payload, "b")
    assert payload["lora"] == [{"id": 1, "scale": 1.0}]
    # Base requests say "no adapter" explicitly (llama-server then clears a slot's cached
    # prompt made with one), replacing any `lora` a client sent.
    base: dict[str, object] = {"model": entry.id, "lora": [{"id": 0, "scale": 1.0}]}
    assert engine.use_base(base)
    assert base["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]


def test_vllm_enables_lora_and_names_the_adapter_as_the_model(
    tmp_path: Path, entry: ModelEntry
) -> None:
    profile = entry.profile("vllm-cpu-bf16")
    assert profile is not None
    engine = VllmEngine(entry.id, tmp_path, profile, [], tmp_path / "cache", None)
    assert "--enable-lora" not in engine.command(Path("/r/e.sock")).argv
    engine.lora = LoraLimits(max_rank=64, max_loras=4)
    engine.adapters = (Adapter("a", tmp_path / "a", tmp_path / "a" / "adapter.gguf"),)
    cmd = engine.command(Path("/r/e.sock"))
    tail = cmd.argv[cmd.argv.index("--enable-lora") :]
    assert tail[:7] == ["--enable-lora", "--max-lora-rank", "64", "--max-loras", "4",
                        "--lora-modules", f"a={tmp_path}/a"]  # fmt: skip
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    payload: dict[str, object] = {"model": "a"}
    engine.use_adapter(payload, "a")
    assert payload == {"model": "a"}


def test_lora_settings_are_checked() -> None:
    settings = load_settings(env={"INFERD_LORA_PATH": "/a", "INFERD_LORA_REFRESH_S": "5"})
    assert (settings.lora_path, settings.lora_refresh_s, settings.max_lora_rank) == (
        Path("/a"),
        5.0,
        64,
    )
    with pytest.raises(ConfigError, match="max_lora_rank 48 is not one of"):
        load_settings(env={"INFERD_MAX_LORA_RANK": "48"})
    with pytest.raises(ConfigError, match="lora_refresh_s must not be negative"):
        load_settings(env={"INFERD_LORA_REFRESH_S": "-1"})


def test_the_service_places_each_adapter_on_its_base_and_refuses_the_rest(
    tmp_path: Path, entry: ModelEntry
) -> None:
    profile = entry.profile("vllm-cpu-bf16")
    assert profile is not None
    engine = VllmEngine(entry.id, tmp_path / "model", profile, [], tmp_path / "engine", None)
    served = ServedModel(entry, profile, Supervisor(engine, ready_timeout_s=1))
    folder = tmp_path / "lora"
    make_adapter(folder / "good")
    make_adapter(folder / "big", rank=128)
    make_adapter(folder / entry.id)  # would hide the base model
    store = ModelStore(tmp_path / "cache")
    store.ensure_writable()
    settings = load_settings(env={"INFERD_LORA_PATH": str(folder), "INFERD_MAX_LORA_RANK": "64"})
    adapters = Adapters.from_settings(settings, [served], store)
    assert list(adapters.served) == ["good"]
    assert set(adapters.refused) == {"big", entry.id}
    assert "a served model has that id" in adapters.refused[entry.id]
    found = adapters.find("good")
    assert found is not None and found.base is served
    assert adapters.find("big") is None and adapters.find(entry.id) is None
    assert [a.name for a in engine.adapters] == ["good"]
    assert engine.adapters[0].folder == found.stored.path  # the cache's copy, not the source
    listed = adapters.models_listed()
    assert [(m["id"], m["parent"], m["root"]) for m in listed] == [("good", entry.id, entry.id)]
    with pytest.raises(ConfigError, match="is not a folder"):
        Adapters.from_settings(
            load_settings(env={"INFERD_LORA_PATH": str(tmp_path / "none")}), [served], store
        )


def test_with_both_engines_behind_the_model_each_holds_and_applies_the_adapter(
    tmp_path: Path, entry: ModelEntry
) -> None:
    """cpu-both: an adapter goes to llama.cpp (GGUF, by its place in the list) and to vLLM (by
    name), and a request gets it in the terms of the engine its slot names."""
    llama_profile, vllm_profile = entry.profile("llamacpp-cpu-q8_0"), entry.profile("vllm-cpu-bf16")
    assert llama_profile is not None and vllm_profile is not None
    llama = LlamaCppEngine(entry.id, tmp_path, llama_profile, [], tmp_path / "l", None)
    vllm = VllmEngine(entry.id, tmp_path, vllm_profile, [], tmp_path / "v", None)
    served = ServedModel(
        entry,
        llama_profile,
        Supervisor(llama, ready_timeout_s=1),
        others=(Backend(vllm_profile, Supervisor(vllm, ready_timeout_s=1)),),
        combined="cpu-both",
    )
    store = ModelStore(tmp_path / "cache")
    adapters = Adapters(tmp_path, [served], store, max_rank=16, max_loras=2)
    assert llama.lora == vllm.lora == LoraLimits(16, 2)
    path = tmp_path / "topic-0123456789abcdef"
    stored = StoredAdapter("topic", entry.id, path, 8, {})
    # Neither engine runs: each takes the adapter onto the list it starts with.
    asyncio.run(adapters._apply(served, [ServedAdapter("topic", served, stored)]))
    assert [a.name for a in llama.adapters] == [a.name for a in vllm.adapters] == ["topic"]
    assert "--lora-scaled" in llama.adapter_flags() and "--enable-lora" in vllm.adapter_flags()
    found = adapters.find("topic")
    assert found is not None
    metrics = Metrics()
    running, waiting = metrics.requests_running, metrics.requests_waiting
    admission = Admission(entry.id, Limits(2, 2, 1.0), running, waiting)
    on_llama: dict[str, object] = {"model": "topic"}
    found.use(Slot(admission, 0), served.backends[0].supervisor.engine, on_llama)
    assert on_llama["lora"] == [{"id": 0, "scale": 1.0}]
    on_vllm: dict[str, object] = {"model": "topic"}
    found.use(Slot(admission, 1), served.backends[1].supervisor.engine, on_vllm)
    assert on_vllm == {"model": "topic"}  # vLLM picks the adapter by `model`
    base_on_llama: dict[str, object] = {"model": entry.id}
    assert adapters.plain(served.backends[0].supervisor.engine, base_on_llama)
    assert base_on_llama["lora"] == [{"id": 0, "scale": 0.0}]
    base_on_vllm: dict[str, object] = {"model": entry.id}
    assert not adapters.plain(served.backends[1].supervisor.engine, base_on_vllm)
    assert base_on_vllm == {"model": entry.id}
