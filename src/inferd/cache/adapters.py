"""LoRA adapters in Hugging Face PEFT's format: read one, and check it fits its base model.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`. Before one is
served it is read here without loading any weights (the config's fields, and the safetensors
header: every tensor's name, dtype, shape and byte range) and checked against the catalog entry
of the model it would run on: the base model it names, each tensor's shape against the
architecture block (hidden and MLP sizes, heads, layers), the projections it targets (only ones
both engines apply), its rank against the service's limit, and that the file holds every byte
its header promises. Anything else is an `AdapterError` naming the reason; the caller
(`server.adapters`) refuses that adapter and goes on serving. `cache.adapter_store` hashes and
keeps what passed.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from inferd.catalog.schema import Architecture, ModelEntry
from inferd.errors import AdapterError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FILES = (CONFIG, WEIGHTS)
# A safetensors header is JSON; a real adapter's is a few hundred KB at most.
MAX_HEADER_BYTES = 16 * 2**20
MAX_CONFIG_BYTES = 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
# PEFT's tensor names: base_model.model.<module path>.lora_{A,B}.weight
_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\.")
# An adapter id is a path segment of /v1/models/{id} and a file name in the cache.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def module_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(input, output) features of each projection an adapter may target, by its module name
    in Hugging Face's decoder models (Llama, Mistral, Qwen, Gemma; Phi-3's fused ones)."""
    h, heads, kv, d, mlp = (
        arch.hidden_size,
        arch.attention_heads,
        arch.kv_heads,
        arch.head_dim,
        arch.intermediate_size,
    )
    return {
        "q_proj": (h, heads * d),
        "k_proj": (h, kv * d),
        "v_proj": (h, kv * d),
        "o_proj": (heads * d, h),
        "qkv_proj": (h, (heads + 2 * kv) * d),
        "gate_proj": (h, mlp),
        "up_proj": (h, mlp),
        "gate_up_proj": (h, 2 * mlp),
        "down_proj": (mlp, h),
    }


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter folder says about itself (read, not yet checked against a base)."""

    name: str
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def base_model(self) -> str:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) else ""

    @property
    def rank(self) -> int:
        """The largest rank of any of its tensors (PEFT's `rank_pattern` may vary it)."""
        ranks = [t.shape[0] for n, t in self.tensors.items() if n.endswith(".lora_A.weight")]
        return max(ranks, default=0)

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0)


def read(folder: Path) -> AdapterSpec:
    """The adapter in `folder`, or `AdapterError` when its files are missing or malformed."""
    name = folder.name
    if not NAME.match(name):
        raise AdapterError(
            f"adapter folder name {name!r} is not a usable model id (letters, digits, '.', "
            "'_', '-'; 128 characters at most)"
        )
    for file in FILES:
        if not (folder / file).is_file():
            raise AdapterError(f"adapter {name}: {file} is missing")
    config = _read_config(folder / CONFIG, name)
    tensors = read_header(folder / WEIGHTS, name)
    return AdapterSpec(name, folder, config, tensors)


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter {name}: {CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(raw)
    except OSError as exc:
        raise AdapterError(f"adapter {name}: cannot read {CONFIG}: {exc.strerror}") from None
    except ValueError as exc:
        raise AdapterError(f"adapter {name}: {CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name}: {CONFIG} is not a JSON object")
    return config


def read_header(path: Path, name: str) -> dict[str, Tensor]:
    """Every tensor the safetensors file declares, checked against the file's real size (a
    truncated or padded file is refused here, before any engine sees it)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AdapterError(f"adapter {name}: {WEIGHTS} is too short to be safetensors")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise AdapterError(f"adapter {name}: {WEIGHTS} has a broken safetensors header")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise AdapterError(f"adapter {name}: cannot read {WEIGHTS}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise AdapterError(f"adapter {name}: {WEIGHTS} has a broken safetensors header") from None
    if not isinstance(header, dict):
        raise AdapterError(f"adapter {name}: {WEIGHTS} has a broken safetensors header")
    header.pop("__metadata__", None)
    tensors: dict[str, Tensor] = {}
    data_bytes = size - 8 - length
    for key, info in header.items():
        tensors[key] = _tensor(key, info, data_bytes, name)
    if not tensors:
        raise AdapterError(f"adapter {name}: {WEIGHTS} holds no tensors")
    if max(t.end for t in tensors.values()) != data_bytes:
        raise AdapterError(
            f"adapter {name}: {WEIGHTS} is {size} bytes, not what its header describes "
            "(truncated or altered)"
        )
    return tensors


def _tensor(key: str, info: Any, data_bytes: int, name: str) -> Tensor:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(n, int) and n >= 0 for n in (*shape, start, end))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok or dtype not in DTYPE_BYTES:
        raise AdapterError(f"adapter {name}: tensor {key} has a broken header entry")
    count = 1
    for n in shape:
        count *= n
    if end - start != count * DTYPE_BYTES[dtype] or end > data_bytes:
        raise AdapterError(
            f"adapter {name}: tensor {key} lies outside {WEIGHTS} (truncated or altered)"
        )
    return Tensor(dtype, shape, start, end)


def base_names(entry: ModelEntry) -> set[str]:
    """The names an adapter may give its base model as: the catalog id, the model's name, and
    each Hugging Face repository it comes from (compared by last path segment, any case)."""
    names = {entry.id, entry.name}
    for source in entry.sources:
        repo = getattr(source, "repo", None)
        if repo:
            names.add(repo)
    return {PurePosixPath(n).name.lower() for n in names if n}


def check(spec: AdapterSpec, entry: ModelEntry, max_rank: int) -> None:
    """`AdapterError` unless `spec` fits `entry` as its base, within `max_rank`."""
    name, cfg = spec.name, spec.config
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {name}: peft_type {cfg.get('peft_type')} is not LORA")
    for flag, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if cfg.get(flag):
            raise AdapterError(f"adapter {name}: {why} is not supported by the engines")
    _check_base(spec, entry)
    if spec.rank > max_rank:
        raise AdapterError(
            f"adapter {name}: rank {spec.rank} is above this service's limit of {max_rank} "
            "(INFERD_MAX_LORA_RANK)"
        )
    _check_shapes(spec, entry.architecture, entry.id)


def _check_base(spec: AdapterSpec, entry: ModelEntry) -> None:
    named = spec.base_model
    # A local path (where PEFT was run) says nothing portable: the shapes decide.
    if not named or named.startswith(("/", "./", "../", "~")):
        return
    if PurePosixPath(named).name.lower() not in base_names(entry):
        raise AdapterError(
            f"adapter {spec.name}: trained for {named}, not for {entry.id} ({entry.name})"
        )


def _check_shapes(spec: AdapterSpec, arch: Architecture, base: str) -> None:
    shapes = module_shapes(arch)
    halves: dict[str, set[str]] = {}
    for key, tensor in spec.tensors.items():
        found = _TENSOR.match(key)
        if found is None:
            raise AdapterError(f"adapter {spec.name}: tensor {key} is not a LoRA A/B weight")
        module, half = found["module"], found["half"]
        kind = module.rsplit(".", 1)[-1]
        if kind not in shapes:
            raise AdapterError(
                f"adapter {spec.name}: targets {kind}, which inferd does not serve adapters on "
                f"(known: {', '.join(sorted(shapes))})"
            )
        layer = _LAYER.search(module)
        if layer is None or int(layer["index"]) >= arch.layers:
            raise AdapterError(f"adapter {spec.name}: {module} is not a layer of {base}")
        if len(tensor.shape) != 2:
            raise AdapterError(f"adapter {spec.name}: {key} is not a matrix")
        features_in, features_out = shapes[kind]
        expected_in = tensor.shape[1] == features_in if half == "A" else True
        expected_out = tensor.shape[0] == features_out if half == "B" else True
        if not (expected_in and expected_out):
            want = f"[r, {features_in}]" if half == "A" else f"[{features_out}, r]"
            raise AdapterError(
                f"adapter {spec.name}: {key} has shape {list(tensor.shape)}, {base} needs "
                f"{want}: the adapter was made for another base model"
            )
        halves.setdefault(module, set()).add(half)
    for module, seen in halves.items():
        if seen != {"A", "B"}:
            raise AdapterError(f"adapter {spec.name}: {module} lacks its lora_A or lora_B")
    ranks = {t.shape[0] for k, t in spec.tensors.items() if ".lora_A." in k}
    ranks_b = {t.shape[1] for k, t in spec.tensors.items() if ".lora_B." in k}
    if ranks != ranks_b and spec.config.get("rank_pattern") in (None, {}):
        raise AdapterError(f"adapter {spec.name}: its lora_A and lora_B ranks differ")
