"""Read a model the user points at (a GGUF file, a Hugging Face folder) into the facts of an entry.

`inspect(path)` opens the files the way the engines would, without loading any weights: a GGUF's
header and metadata (through the `gguf` package), or a folder's config.json, tokenizer files and
safetensors headers. It returns a `LocalModel` (architecture facts for the memory estimate, the
task, the precision, the files with their roles) or refuses, before anything starts, with a
`UsageError` naming the reason: not a model (wrong magic, truncated, unreadable JSON), a folder
without weights or without a tokenizer, only pickled weights (inferd never loads pickles), or an
architecture neither engine serves (`catalog.architectures`). `local_entry` turns the facts, with
the files' sha256 from `cache.local` (hashing is the cache's job), into a `ModelEntry` with
generated profiles. Nothing here writes anywhere.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inferd.catalog import architectures
from inferd.catalog.schema import Architecture, Precision
from inferd.errors import UsageError

GGUF_MAGIC = b"GGUF"
# Files of a Hugging Face folder that are never served: other formats' weights (pickles above
# all: loading one can run code), inferd's own record in its cache folders, hidden files.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".gguf")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PROVENANCE = "provenance.json"
# A tokenizer is one of these (a fast tokenizer, a SentencePiece model, or BPE vocab + merges).
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
# Models whose MLP has two matrices rather than a gated three (the estimate counts them).
PLAIN_MLP = frozenset({"gpt2", "bloom", "falcon", "gpt_neox", "gptj", "starcoder2", "opt", "mpt"})
# safetensors dtypes -> precision; GGUF file types -> the precision the estimate sizes them as.
SAFETENSORS_DTYPES: dict[str, Precision] = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
GGUF_FILE_TYPES: dict[int, Precision] = {
    0: "fp32",
    1: "fp16",
    32: "bf16",
    7: "q8_0",
    3: "q4_1",
    15: "q4_k_m",
}

Role = Literal["weights", "model", "license"]


@dataclass(frozen=True)
class LocalModel:
    """What a model's own files say about it."""

    kind: str  # "gguf" (one file) or "safetensors" (a Hugging Face folder)
    root: Path  # the folder holding the files (a GGUF's parent)
    files: tuple[tuple[str, Role], ...]  # (path relative to root, role)
    family: str  # general.architecture or config.json's model_type
    architecture: Architecture
    parameters: int
    precision: Precision
    file_type: str  # as the files say it (GGUF "Q5_K_M"; safetensors "BF16")
    chat: bool  # a chat template is present
    license: str
    hf_architecture: str | None  # the class vLLM would load (None: vLLM cannot serve it)
    llamacpp: bool  # llama.cpp serves it (GGUF only: no converter from safetensors)


def model_id_for(path: Path) -> str:
    """The id a model given by path is served under: its lower-cased name without `.gguf`,
    every character a model id cannot hold replaced by `-`."""
    name = path.name.removesuffix(".gguf").removesuffix(".GGUF").lower()
    cleaned = re.sub(r"[^a-z0-9.\-]+", "-", name).strip("-.")
    return cleaned or "model"


def file_names(path: Path) -> list[str]:
    """The files of the model at `path` that are served and hashed, relative to its root."""
    if path.is_file():
        return [path.name]
    names = []
    for item in sorted(path.iterdir()):
        if item.name.startswith(".") or item.name == PROVENANCE or not item.is_file():
            continue
        if item.name.endswith(SKIPPED_SUFFIXES):
            continue
        names.append(item.name)
    return names


def inspect(path: Path) -> LocalModel:
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        return _inspect_folder(path)
    return _inspect_gguf(path)


def _refuse(path: Path, why: str) -> UsageError:
    return UsageError(f"{path} cannot be served: {why}")


# --- GGUF -------------------------------------------------------------------------------------


def _gguf_fields(path: Path) -> tuple[dict[str, Any], list[Any]]:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise _refuse(path, "not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises many kinds on a damaged or cut file
        reason = str(exc) or type(exc).__name__
        raise _refuse(path, f"damaged or truncated GGUF file ({reason})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise _refuse(path, f"truncated GGUF file (tensor {tensor.name} ends past its end)")
    fields = {}
    for name, field in reader.fields.items():
        if len(field.types) > 1:  # an array: only its length is needed (the vocabulary size)
            fields[name] = len(field.data)
        else:
            fields[name] = field.contents()
    return fields, list(reader.tensors)


def _inspect_gguf(path: Path) -> LocalModel:
    if path.suffix.lower() != ".gguf":
        raise _refuse(path, "a model file must be a GGUF (.gguf); other files go in a folder")
    fields, tensors = _gguf_fields(path)
    if int(fields.get("split.count") or 1) > 1:
        # llama-server finds the other parts beside the first; inferd links one file.
        raise _refuse(
            path,
            "a GGUF split in parts is not served by path; merge it first "
            "(llama-gguf-split --merge)",
        )
    arch = str(fields.get("general.architecture", ""))
    if not arch:
        raise _refuse(path, "its GGUF metadata names no general.architecture")
    if arch not in architectures.llamacpp_architectures():
        raise _refuse(path, f"architecture {arch!r} is not a text-generation model llama.cpp knows")

    def number(key: str, default: int | None = None) -> int:
        value = fields.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (OpenELM): the largest sizes memory
            value = max(value)
        if value is None:
            raise _refuse(path, f"its GGUF metadata lacks {arch}.{key}")
        return int(value)

    hidden, heads = number("embedding_length"), number("attention.head_count")
    layout = Architecture(
        layers=number("block_count"),
        hidden_size=hidden,
        intermediate_size=number("feed_forward_length", 4 * hidden),
        attention_heads=heads,
        kv_heads=number("attention.head_count_kv", heads),
        head_dim=number("attention.key_length", hidden // max(heads, 1)),
        vocab_size=int(fields.get("tokenizer.ggml.tokens") or number("vocab_size", 0)),
        max_context=number("context_length"),
        tied_embeddings=not any(t.name == "output.weight" for t in tensors),
        experts=max(number("expert_count", 1), 1),
        experts_per_token=max(number("expert_used_count", 1), 1),
    )
    file_type = int(fields.get("general.file_type", -1))
    from gguf import LlamaFileType

    type_name = (
        LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        if file_type in LlamaFileType._value2member_map_
        else "unknown"
    )
    return LocalModel(
        kind="gguf",
        root=path.parent,
        files=((path.name, "weights"),),
        family=arch,
        architecture=layout,
        parameters=sum(int(t.n_elements) for t in tensors),
        precision=_gguf_precision(file_type, type_name),
        file_type=type_name,
        chat=bool(fields.get("tokenizer.chat_template")),
        license=str(fields.get("general.license") or "unknown"),
        hf_architecture=architectures.gguf_convertible(arch),
        llamacpp=True,
    )


def _gguf_precision(file_type: int, name: str) -> Precision:
    """The precision the estimate sizes the weights as: exact for the types it knows, else the
    next larger known one (an estimate on the safe side)."""
    if file_type in GGUF_FILE_TYPES:
        return GGUF_FILE_TYPES[file_type]
    bits = re.match(r"I?Q(\d)", name)
    if bits and int(bits.group(1)) <= 4:
        return "q4_k_m"
    return "q8_0" if bits else "fp16"


# --- Hugging Face folders ---------------------------------------------------------------------


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _refuse(folder, f"{path.name} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _refuse(folder, f"{path.name} is not a JSON object")
    return data


def safetensors_header(path: Path, folder: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor names, dtypes, shapes, offsets), checked against the
    file's size so a truncated file is refused here and not by the engine minutes later."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(size - 8, 100 * 2**20):
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise _refuse(folder, f"{path.name} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise _refuse(folder, f"{path.name} is not a safetensors file")
    end = max(
        (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
    )
    if 8 + length + end > size:
        raise _refuse(folder, f"{path.name} is truncated ({size} bytes, its header needs more)")
    return header


def _inspect_folder(folder: Path) -> LocalModel:
    names = file_names(folder)
    if "config.json" not in names:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; to serve a GGUF, name the file ({folder / ggufs[0]})" if ggufs else ""
        raise _refuse(folder, f"no config.json (a Hugging Face model folder has one){hint}")
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        pickled = [p.name for p in folder.iterdir() if p.name.endswith(PICKLES)]
        why = (
            f"its weights are pickles ({', '.join(pickled)}), which inferd never loads; "
            "save them as safetensors"
            if pickled
            else "no weights (*.safetensors) in the folder"
        )
        raise _refuse(folder, why)
    if not any(all(n in names for n in group) for group in TOKENIZER_SETS):
        raise _refuse(folder, "no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    config = _read_json(folder / "config.json", folder)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(text, dict)
    names_in_config = config.get("architectures") or []
    hf = str(names_in_config[0]) if names_in_config else ""
    if not hf:
        raise _refuse(folder, "config.json names no `architectures`")
    if not architectures.vllm_serves(hf):
        raise _refuse(
            folder,
            f"architecture {hf} is not a text-generation model vLLM {architectures.VLLM_VERSION} "
            "serves (and llama.cpp needs a GGUF file)",
        )
    headers = [safetensors_header(folder / n, folder) for n in weights]
    tensors = [t for h in headers for k, t in h.items() if k != "__metadata__"]
    dtypes = {str(t.get("dtype")) for t in tensors}
    tokenizer_config = folder / "tokenizer_config.json"
    chat = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not chat and tokenizer_config.is_file():
        chat = bool(_read_json(tokenizer_config, folder).get("chat_template"))
    roles = tuple((n, "weights" if n in weights else _role(n)) for n in names)
    return LocalModel(
        kind="safetensors",
        root=folder,
        files=roles,
        family=str(config.get("model_type") or hf),
        architecture=_hf_architecture(text, folder),
        parameters=sum(math.prod(t.get("shape") or [1]) for t in tensors),
        precision=_hf_precision(config, dtypes),
        file_type="/".join(sorted(dtypes)),
        chat=chat,
        license="unknown",
        hf_architecture=hf,
        llamacpp=False,
    )


def _role(name: str) -> Role:
    return "license" if name.upper().startswith(("LICENSE", "LICENCE")) else "model"


def _hf_architecture(config: dict[str, Any], folder: Path) -> Architecture:
    def get(*keys: str, default: int | None = None) -> int:
        for key in keys:
            if isinstance(config.get(key), int | float):
                return int(config[key])
        if default is None:
            raise _refuse(folder, f"config.json lacks {keys[0]}")
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    model_type = str(config.get("model_type", ""))
    experts = get("num_local_experts", "num_experts", default=1)
    # Mixture of experts: each expert's MLP is the smaller `moe_intermediate_size` where given.
    mlp_keys: tuple[str, ...] = ("intermediate_size", "n_inner", "ffn_dim")
    if experts > 1:
        mlp_keys = ("moe_intermediate_size", *mlp_keys)
    return Architecture(
        layers=get("num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        intermediate_size=get(*mlp_keys, default=4 * hidden),
        attention_heads=heads,
        kv_heads=get("num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=get("head_dim", default=hidden // max(heads, 1)),
        vocab_size=get("vocab_size"),
        max_context=get("max_position_embeddings", "n_positions", "seq_length", default=2048),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        mlp="plain" if model_type in PLAIN_MLP else "gated",
        experts=experts,
        experts_per_token=get("num_experts_per_tok", "moe_topk", default=1),
    )


def _hf_precision(config: dict[str, Any], dtypes: set[str]) -> Precision:
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method")
        if method == "awq":
            return "awq"
        if method == "fp8":
            return "fp8"
        return "int8" if quant.get("bits") == 8 or quant.get("load_in_8bit") else "int4"
    for dtype in ("BF16", "F16", "F32"):
        if dtype in dtypes:
            return SAFETENSORS_DTYPES[dtype]
    return "bf16"
