"""A catalog entry for a model given by path: its source (the files, each with its sha256) and the
profiles inferd can offer without having measured the model.

Built from `local_model.LocalModel` (what the files say) and the hashes `cache.local` computed.
The profiles follow the catalog's own for the default model where a setting does not depend on
the model (vLLM's CPU KV cache in bytes, its cores, llama-server's slots), and keep each engine's
defaults where the catalog's choices were measured for one model only (llama-server's attention
settings). Which engines: llama.cpp for a GGUF, vLLM for a Hugging Face folder, and vLLM for a
GGUF too where transformers can convert its architecture (`architectures.GGUF_TO_HF`); a folder
gets no llama.cpp profile (no safetensors -> GGUF converter in the install).
"""

from __future__ import annotations

from inferd.catalog.local_model import LocalModel
from inferd.catalog.schema import ModelEntry, Profile, Requirements, Source, SourceFile

SOURCE_ID = "local"
# The context a generated profile serves: the model's own, up to this (llama-server allocates
# every slot's KV cache at start); `--max-model-len` asks for more, up to the model's limit.
DEFAULT_CONTEXT = 8192
# vLLM's CPU KV cache, in bytes rather than a share of host memory (see the default model's
# vllm-cpu-bf16 notes: the fraction default fails next to anything else).
VLLM_CPU_KV_BYTES = 2 * 2**30
NOT_MEASURED = (
    "Generated from the model's files by `inferd serve PATH`; not measured for this model "
    "(a catalog entry can record measured settings: --catalog-path)."
)


def local_entry(model: LocalModel, model_id: str, hashes: dict[str, tuple[str, int]]) -> ModelEntry:
    """`hashes`: sha256 and size of each of `model.files`, by relative path."""
    source = Source(
        id=SOURCE_ID,
        kind="local",
        format="gguf" if model.kind == "gguf" else "safetensors",
        precision=model.precision,
        path=str(model.root),
        files=tuple(
            SourceFile(path=name, sha256=hashes[name][0], size=hashes[name][1], role=role)
            for name, role in model.files
        ),
    )
    context = min(model.architecture.max_context, DEFAULT_CONTEXT)
    where = f"{model.kind} files in {model.root}"
    return ModelEntry(
        id=model_id,
        name=model.files[0][0] if model.kind == "gguf" else model.root.name,
        family=model.family,
        task="chat" if model.chat else "completion",
        license=model.license,
        parameters=model.parameters,
        architecture=model.architecture,
        description=f"{model.family} model served by path ({where}; {model.file_type}).",
        sources=(source,),
        profiles=tuple(_profiles(model, context)),
    )


def _profiles(model: LocalModel, context: int) -> list[Profile]:
    found: list[Profile] = []
    if model.llamacpp:
        found += _llamacpp(model, context)
    if model.hf_architecture is not None:
        found += _vllm(model, context)
    return found


def _llamacpp(model: LocalModel, context: int) -> list[Profile]:
    precision = model.precision
    shipped = f"the {model.file_type} GGUF as it is (used in place, not copied)"
    return [
        Profile(
            id=f"llamacpp-cpu-{precision}",
            description=f"llama.cpp's llama-server on the CPU, {shipped}.",
            engine="llamacpp",
            precision=precision,
            optimize="latency",
            source=SOURCE_ID,
            format="gguf",
            context=context,
            # llama-server's own default number of slots; more requests wait in inferd's queue.
            max_running=4,
            batch=4,
            requires=Requirements(device="cpu"),
            notes=NOT_MEASURED,
        ),
        Profile(
            id=f"llamacpp-gpu-{precision}",
            description=f"llama.cpp's llama-server with every layer on one NVIDIA GPU, {shipped}.",
            engine="llamacpp",
            precision=precision,
            optimize="latency",
            source=SOURCE_ID,
            format="gguf",
            context=context,
            max_running=16,
            batch=16,
            kv_precision="fp16",
            requires=Requirements(device="gpu"),
            notes=NOT_MEASURED,
        ),
    ]


def _vllm(model: LocalModel, context: int) -> list[Profile]:
    converted = model.kind == "gguf"
    how = (
        "bf16 safetensors converted once from the GGUF into the cache"
        if converted
        else "the folder's safetensors as they are (used in place, not copied)"
    )
    # The CPU build computes in bf16 (or fp32); quantized checkpoints are GPU-only in vLLM.
    quantized = model.precision in ("awq", "fp8", "int8", "int4")
    gpu_precision = "bf16" if converted else model.precision
    if gpu_precision == "fp32":
        gpu_precision = "bf16"
    found = []
    if not quantized:
        found.append(
            Profile(
                id="vllm-cpu-bf16",
                description=f"vLLM's CPU build, {how}.",
                engine="vllm",
                precision="bf16",
                optimize="throughput",
                source=SOURCE_ID,
                format="safetensors",
                context=context,
                max_running=32,
                # vLLM's CPU build has AVX2 kernels for CPUs without AVX-512.
                requires=Requirements(device="cpu", arch=("x86_64",), cpu_features=("avx2",)),
                engine_args={"kv-cache-memory-bytes": VLLM_CPU_KV_BYTES},
                engine_env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                notes=NOT_MEASURED,
            )
        )
    found.append(
        Profile(
            id=f"vllm-gpu-{gpu_precision}",
            description=f"vLLM on one NVIDIA GPU, {how}.",
            engine="vllm",
            precision=gpu_precision,
            optimize="throughput",
            source=SOURCE_ID,
            format="safetensors",
            context=context,
            requires=Requirements(device="gpu"),
            notes=NOT_MEASURED,
        )
    )
    return found
