"""Models given by path: what inferd reads from a GGUF file or a Hugging Face folder, the entry it
builds, what it refuses (one line, before anything starts), and the entry kept in the cache.

The models are made here: a tiny GGUF written with the `gguf` package's writer, and a tiny
random Llama saved by transformers with a word-level tokenizer.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from inferd.cache import ModelStore
from inferd.cache.local import entry_for, prepare_local
from inferd.cache.prepare import intact
from inferd.catalog import Catalog, architectures
from inferd.catalog.local_entry import local_entry
from inferd.catalog.local_model import inspect, model_id_for
from inferd.cli.plan import catalog_match, model_entry
from inferd.config import load_settings
from inferd.errors import UnknownModelError, UsageError

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 32


def write_gguf(path: Path, arch: str = "llama", *, chat: bool = True, parts: int = 1) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    if parts > 1:
        writer.add_uint16("split.count", parts)
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(4 * HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    if chat:
        writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.ones((VOCAB, HIDDEN), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((HIDDEN, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "Tiny-Chat.F32.gguf")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a tokenizer and a chat template, saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "Tiny-Llama"
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


def copy_folder(src: Path, dest: Path, *, without: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for item in src.iterdir():
        if item.name not in without and not any(item.name.startswith(w) for w in without):
            (dest / item.name).write_bytes(item.read_bytes())
    return dest


def test_a_gguf_file_is_read_into_an_entry_with_llamacpp_and_vllm_profiles(
    gguf_file: Path,
) -> None:
    found = inspect(gguf_file)
    arch = found.architecture
    assert (arch.layers, arch.hidden_size, arch.attention_heads, arch.kv_heads) == (2, 64, 4, 2)
    assert (arch.vocab_size, arch.max_context, arch.head_dim) == (VOCAB, 2048, 16)
    assert arch.tied_embeddings  # no output.weight tensor
    assert found.parameters == VOCAB * HIDDEN + HIDDEN * HIDDEN
    assert (found.precision, found.file_type, found.chat) == ("fp32", "F32", True)
    assert found.hf_architecture == "LlamaForCausalLM"  # transformers converts llama GGUFs
    entry = local_entry(found, model_id_for(gguf_file), {gguf_file.name: ("a" * 64, 123)})
    assert entry.id == "tiny-chat.f32"
    assert entry.task == "chat"
    assert [p.id for p in entry.profiles] == [
        "llamacpp-cpu-fp32",
        "llamacpp-gpu-fp32",
        "vllm-cpu-bf16",
        "vllm-gpu-bf16",
    ]
    source = entry.sources[0]
    assert (source.kind, source.path, source.format) == ("local", str(gguf_file.parent), "gguf")
    assert [(f.path, f.sha256, f.role) for f in source.files] == [
        (gguf_file.name, "a" * 64, "weights")
    ]


def test_a_gguf_without_chat_template_is_a_completion_model(tmp_path: Path) -> None:
    found = inspect(write_gguf(tmp_path / "base.gguf", chat=False))
    assert local_entry(found, "base", {"base.gguf": ("b" * 64, 1)}).task == "completion"


def test_a_gguf_architecture_transformers_cannot_convert_gets_llamacpp_only(
    tmp_path: Path,
) -> None:
    found = inspect(write_gguf(tmp_path / "olmo.gguf", arch="olmo2"))
    entry = local_entry(found, "olmo", {"olmo.gguf": ("c" * 64, 1)})
    assert {p.engine for p in entry.profiles} == {"llamacpp"}


def test_a_hugging_face_folder_is_read_into_vllm_profiles(hf_folder: Path) -> None:
    found = inspect(hf_folder)
    arch = found.architecture
    assert (arch.layers, arch.hidden_size, arch.kv_heads, arch.max_context) == (2, 64, 2, 1024)
    assert (found.kind, found.hf_architecture, found.family) == (
        "safetensors",
        "LlamaForCausalLM",
        "llama",
    )
    assert found.chat and not found.llamacpp
    names = dict(found.files)
    assert names["model.safetensors"] == "weights"
    assert names["config.json"] == names["tokenizer.json"] == "model"
    hashes = {n: ("d" * 64, 1) for n, _ in found.files}
    entry = local_entry(found, model_id_for(hf_folder), hashes)
    assert entry.id == "tiny-llama"
    assert [p.id for p in entry.profiles] == ["vllm-cpu-bf16", "vllm-gpu-bf16"]


@pytest.mark.parametrize(
    ("name", "model_id"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct.q4-1"),
        ("My Model_v2", "my-model-v2"),
        ("safetensors-bf16", "safetensors-bf16"),
    ],
)
def test_the_model_id_comes_from_the_name(name: str, model_id: str) -> None:
    assert model_id_for(Path("/x") / name) == model_id


def _text_renamed(tmp: Path) -> Path:
    path = tmp / "notes.gguf"
    path.write_text("these are notes, not a model\n")
    return path


def _truncated(tmp: Path) -> Path:
    path = write_gguf(tmp / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _unknown_arch(tmp: Path) -> Path:
    return write_gguf(tmp / "odd.gguf", arch="no-such-arch")


def _embedding_arch(tmp: Path) -> Path:
    return write_gguf(tmp / "bert.gguf", arch="bert")


def _split(tmp: Path) -> Path:
    return write_gguf(tmp / "big-00001-of-00002.gguf", parts=2)


def _gguf_folder(tmp: Path) -> Path:
    write_gguf(tmp / "only.gguf")
    return tmp


def _not_gguf(tmp: Path) -> Path:
    path = tmp / "weights.safetensors"
    path.write_bytes(b"\0" * 16)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_text_renamed, "not a GGUF file"),
        (_truncated, "truncated GGUF file"),
        (_unknown_arch, "architecture 'no-such-arch' is not a text-generation model"),
        (_embedding_arch, "architecture 'bert' is not a text-generation model"),
        (_not_gguf, "a model file must be a GGUF"),
        (_split, "a GGUF split in parts"),
        (_gguf_folder, "no config.json .*to serve a GGUF, name the file"),
        (lambda tmp: tmp / "missing.gguf", "no such file or folder"),
    ],
)
def test_files_that_are_not_models_are_refused_with_the_reason(
    tmp_path: Path, make: object, words: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(UsageError, match=words) as caught:
        inspect(path)
    assert "\n" not in caught.value.message


def test_folders_that_cannot_be_served_are_refused_with_the_reason(
    hf_folder: Path, tmp_path: Path
) -> None:
    cases: list[tuple[Path, str]] = []
    no_weights = copy_folder(hf_folder, tmp_path / "a", without=("model.safetensors",))
    cases.append((no_weights, "no weights"))
    pickled = copy_folder(hf_folder, tmp_path / "b", without=("model.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    cases.append((pickled, "pickles"))
    cases.append((copy_folder(hf_folder, tmp_path / "c", without=("tokenizer",)), "no tokenizer"))
    cases.append((copy_folder(hf_folder, tmp_path / "d", without=("config.json",)), "config"))
    bert = copy_folder(hf_folder, tmp_path / "e")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    cases.append((bert, "architecture BertModel is not a text-generation model vLLM"))
    cut = copy_folder(hf_folder, tmp_path / "f")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cases.append((cut, "model.safetensors is truncated"))
    for folder, words in cases:
        with pytest.raises(UsageError, match=words):
            inspect(folder)


def test_the_entry_is_kept_in_the_cache_and_a_changed_file_is_noticed(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "cache")
    first = entry_for(gguf_file, store, "tiny")
    digest = first.sources[0].files[0].sha256
    assert len(list((store.root / "local").glob("*.json"))) == 1

    def no_reading(path: Path) -> None:
        raise AssertionError("the kept entry should have been used")

    monkeypatch.setattr("inferd.catalog.local_model.inspect", no_reading)
    again = entry_for(gguf_file, store, "renamed")
    assert again.id == "renamed" and again.sources == first.sources
    monkeypatch.undo()
    write_gguf(gguf_file, chat=False)  # same name, new content (and size)
    changed = entry_for(gguf_file, store, "tiny")
    assert changed.task == "completion"
    assert changed.sources[0].files[0].sha256 != digest


def test_the_engine_folder_links_the_files_in_place_with_their_sha256(
    gguf_file: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "cache")
    store.ensure_writable()
    entry = entry_for(gguf_file, store, "tiny")
    profile = entry.profiles[0]
    prepared = prepare_local(entry, profile, store)
    link = prepared.path / gguf_file.name
    assert link.is_symlink() and link.resolve() == gguf_file
    files = prepared.provenance["source"]["files"]
    assert files == {gguf_file.name: entry.sources[0].files[0].sha256}
    assert prepared.provenance["outputs"] == files
    # `cache verify` and `serve --dry-run` re-hash through the links: intact.
    assert intact(prepared.path, entry.sources[0]) is not None
    assert prepare_local(entry, profile, store).reused


def test_plan_resolves_paths_and_keeps_catalog_ids(gguf_file: Path, tmp_path: Path) -> None:
    settings = load_settings({"cache_path": str(tmp_path / "cache")}, env={})
    assert model_entry(settings, "smollm2-135m-instruct").id == "smollm2-135m-instruct"
    assert model_entry(settings, str(gguf_file)).id == "tiny-chat.f32"
    with pytest.raises(UnknownModelError, match="or give a path to a GGUF file"):
        model_entry(settings, "llama-9000")
    named = load_settings(
        {"cache_path": str(tmp_path / "cache"), "served_model_name": "Bad Name"}, env={}
    )
    with pytest.raises(UsageError, match="a model id is lower-case"):
        model_entry(named, str(gguf_file))
    taken = load_settings(
        {"cache_path": str(tmp_path / "cache"), "served_model_name": "smollm2-135m-instruct"},
        env={},
    )
    with pytest.raises(UsageError, match="a catalog model's id"):
        model_entry(taken, str(gguf_file))


def test_hub_models_need_the_hub(tmp_path: Path) -> None:
    offline = load_settings({"cache_path": str(tmp_path), "offline": "1"}, env={})
    with pytest.raises(UsageError, match="--offline"):
        model_entry(offline, "hf://org/name@main")
    with pytest.raises(UsageError, match="hf://ORG/NAME"):
        model_entry(offline, "hf://just-a-name")


def test_a_file_the_catalog_ships_is_pointed_out(gguf_file: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    entry = entry_for(gguf_file, store, "mine")
    shipped = entry.model_copy(update={"id": "shipped-model"})
    assert "catalog model shipped-model's own file" in catalog_match(entry, Catalog([shipped]))
    assert catalog_match(entry, Catalog.load()) == ""


def test_the_vllm_table_is_vllms_own_registry() -> None:
    """The static table (vLLM's registry costs 25 s to import) equals the installed vLLM's."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    registry = Path(spec.origin).parent / "model_executor" / "models" / "registry.py"
    tree = ast.parse(registry.read_text())
    names = next(
        {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Dict)
        and getattr(node.targets[0], "id", "") == "_TEXT_GENERATION_MODELS"
    )
    assert names == architectures.VLLM_TEXT_GENERATION


def test_the_convertible_gguf_architectures_are_those_transformers_reads() -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    for arch in architectures.GGUF_TO_HF:
        # transformers spells the MoE ones with an underscore (qwen2moe -> qwen2_moe).
        assert arch.replace("moe", "_moe") in GGUF_SUPPORTED_ARCHITECTURES, arch
        assert arch in architectures.llamacpp_architectures(), arch
