"""Profile selection: which of a model's profiles runs on this hardware, and why the others don't.

Every profile gets a status:

- `runnable`: every requirement holds and the memory estimate fits at the profile's context;
- `smaller-context`: everything holds but memory, which fits at a smaller context (named, so the
  user knows what `--max-model-len` to ask for);
- `incompatible`: a requirement fails (each reason is given).

The selection rules, in order (documented in docs/profiles.md and tested):
1. keep the runnable profiles (a `smaller-context` one only when the user lowered the context);
2. prefer GPU profiles over CPU ones (a model with both, on a machine with a GPU);
3. if the user asked to optimize for latency or throughput, prefer profiles made for that;
4. prefer hardware-specific profiles (made for this GPU family or CPU feature) over generic ones;
5. prefer the faster engine;
6. prefer the lower precision that keeps quality (fp8 before bf16 before int8/int4);
7. then fewer GPUs for throughput, more GPUs for latency.
A profile named with `--profile` is honoured or refused with its reasons; `--force` runs it anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inferd.catalog.estimate import Estimate, estimate
from inferd.catalog.hardware import Hardware
from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import NoProfileError

RUNNABLE, SMALLER, INCOMPATIBLE = "runnable", "smaller-context", "incompatible"
# Engines by serving speed on each device for one user, fastest first (a lower rank wins).
# CPU: llama.cpp decodes a single stream faster and starts in about a second (measured,
# benchmarks/RESULTS.md); vLLM wins on batch throughput, which `--optimize throughput` asks for.
ENGINE_RANK = {"gpu": {"vllm": 0, "llamacpp": 1}, "cpu": {"llamacpp": 0, "vllm": 1}}
# Lower precision first, as long as it keeps quality: fp8 is near-lossless on GPUs that have it;
# integer quantisations cost quality and come after bf16.
PRECISION_RANK = {
    "fp8": 0,
    "bf16": 1,
    "fp16": 1,
    "fp32": 2,
    "q8_0": 3,
    "int8": 3,
    "q4_k_m": 4,
    "q4_1": 4,
    "awq": 4,
    "int4": 4,
}


@dataclass(frozen=True)
class Candidate:
    profile: Profile
    status: str
    reasons: tuple[str, ...]  # why it cannot run here (incompatible) or what is short (smaller)
    estimate: Estimate | None

    @property
    def runnable(self) -> bool:
        return self.status == RUNNABLE

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _requirement_gaps(profile: Profile, hw: Hardware) -> list[str]:
    req, gaps = profile.requires, []
    if req.device == "gpu":
        if not hw.gpus:
            return ["needs an NVIDIA GPU; none detected"]
        if len(hw.gpus) < profile.gpus:
            gaps.append(f"needs {profile.gpus} GPUs, {len(hw.gpus)} here")
        gpu = hw.gpus[0]
        cc = gpu.compute_capability[0] + gpu.compute_capability[1] / 10
        if req.gpu_families and gpu.family not in req.gpu_families:
            gaps.append(
                f"needs a {'/'.join(req.gpu_families)} GPU, this is {gpu.name} ({gpu.family})"
            )
        elif cc < req.min_compute_capability:
            gaps.append(
                f"needs compute capability {req.min_compute_capability:g}+, {gpu.name} has {cc:g}"
            )
    if req.arch and hw.cpu.arch not in req.arch:
        gaps.append(f"needs a {'/'.join(req.arch)} CPU, this is {hw.cpu.arch}")
    missing = [f for f in req.cpu_features if f not in hw.cpu.features]
    if missing:
        gaps.append(f"needs CPU features {', '.join(missing)}")
    if hw.cpu.usable_cores < req.min_cores:
        gaps.append(f"needs {req.min_cores} cores, {hw.cpu.usable_cores} usable")
    return gaps


def check(
    model: ModelEntry,
    profile: Profile,
    hw: Hardware,
    context: int | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> Candidate:
    """`unavailable`: engines that cannot be started here, with why (e.g. not installed), by
    engine name or by `engine:device` (e.g. `llamacpp:gpu`: a llama-server without CUDA)."""
    unavailable = unavailable or {}
    gaps = _requirement_gaps(profile, hw)
    if gaps:
        # A device-specific engine reason ("built without CUDA") says nothing where the device
        # itself is missing; a missing engine still does.
        if profile.engine in unavailable:
            gaps.append(unavailable[profile.engine])
        return Candidate(profile, INCOMPATIBLE, tuple(gaps), None)
    missing = unavailable.get(profile.engine) or unavailable.get(
        f"{profile.engine}:{profile.requires.device}"
    )
    est = estimate(model, profile, hw, context)
    if missing:
        # The hardware fits: say so with the estimate (seen on a GPU machine without vLLM, where
        # "-" under memory left the user guessing whether installing the engine would help).
        fit = []
        if est.fits_context is not None and not est.fits:
            fit = [f"fits with --max-model-len {est.fits_context}"]
        elif not est.fits:
            fit = [f"does not fit: {est.describe()}"]
        return Candidate(profile, INCOMPATIBLE, (missing, *fit), est)
    if est.fits:
        return Candidate(profile, RUNNABLE, (), est)
    if est.fits_context is not None:
        return Candidate(
            profile,
            SMALLER,
            (
                f"{est.describe()}; fits with a {est.fits_context}-token context "
                f"(--max-model-len {est.fits_context})",
            ),
            est,
        )
    return Candidate(profile, INCOMPATIBLE, (f"does not fit: {est.describe()}",), est)


def candidates(
    model: ModelEntry,
    hw: Hardware,
    context: int | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> list[Candidate]:
    return [check(model, p, hw, context, unavailable) for p in model.profiles]


def rank_key(c: Candidate, optimize: str | None) -> tuple[int, ...]:
    p = c.profile
    device = p.requires.device
    goal = optimize or "throughput"
    return (
        # A GPU profile before any CPU one, whatever the goal: on the H200 the default model's
        # GPU profile beat its CPU profiles at one stream and at sixteen (benchmarks/RESULTS.md).
        int(device != "gpu"),
        int(optimize is not None and p.optimize != optimize),
        int(not (p.requires.gpu_families or p.requires.cpu_features)),
        ENGINE_RANK[device].get(p.engine, 9),
        p.priority,
        PRECISION_RANK.get(p.precision, 9),
        p.gpus if goal == "throughput" else -p.gpus,
    )


def select(
    model: ModelEntry,
    hw: Hardware,
    wanted: str = "default",
    *,
    optimize: str | None = None,
    context: int | None = None,
    force: bool = False,
    unavailable: Mapping[str, str] | None = None,
    found: list[Candidate] | None = None,
) -> Candidate:
    """The profile to run: `wanted` by id, or the best runnable one for `default`.
    `found`: this model's `candidates` on `hw`, when the caller has them already."""
    if found is None:
        found = candidates(model, hw, context, unavailable)
    if wanted != "default":
        match = next((c for c in found if c.profile.id == wanted), None)
        if match is None:
            known = ", ".join(c.profile.id for c in found)
            raise NoProfileError(f"model {model.id} has no profile {wanted!r}; it has: {known}")
        if not match.runnable and not force:
            raise NoProfileError(
                f"profile {wanted} cannot run here: {match.reason} (--force runs it anyway)"
            )
        return match
    runnable = [c for c in found if c.runnable]
    if runnable:
        return min(runnable, key=lambda c: rank_key(c, optimize))
    detail = "; ".join(f"{c.profile.id}: {c.reason}" for c in found)
    raise NoProfileError(
        f"no profile of {model.id} runs on this machine ({hw.summary()}): {detail}"
    )


def best_by_goal(found: list[Candidate]) -> dict[str, str]:
    """The profile each `--optimize` goal would pick among the runnable ones."""
    runnable = [c for c in found if c.runnable]
    picks: dict[str, str] = {}
    for goal in ("latency", "throughput"):
        # What `select` would do with the goal (a GPU profile still comes first), as long as
        # some runnable profile is made for the goal at all.
        if any(c.profile.optimize == goal for c in runnable):
            picks[goal] = min(runnable, key=lambda c: rank_key(c, goal)).profile.id
    return picks


def explain(chosen: Candidate, found: list[Candidate], optimize: str | None) -> str:
    """Why `select` picked `chosen`, in one sentence a user can act on."""
    p = chosen.profile
    picks = best_by_goal(found)
    others = [f"--optimize {goal} picks {pid}" for goal, pid in picks.items() if pid != p.id]
    tail = f"; {', '.join(others)}" if others else ""
    what = f"{p.engine}, {p.precision}, made for {p.optimize}"
    if optimize is not None:
        if p.optimize != optimize:
            cpu = [
                c
                for c in found
                if c.runnable
                and c.profile.requires.device == "cpu"
                and c.profile.optimize == optimize
            ]
            if p.requires.device == "gpu" and cpu:
                best = min(cpu, key=lambda c: rank_key(c, optimize)).profile.id
                return (
                    f"--optimize {optimize}: GPU profiles come first; {p.id} ({what}) is the "
                    f"best on the GPU (for the CPU, --profile {best})"
                )
            return f"no {optimize} profile runs here; {p.id} ({what}) is the best that does{tail}"
        return f"--optimize {optimize}: {p.id} ({what}) is the best runnable one{tail}"
    if sum(c.runnable for c in found) <= 1:
        return f"{p.id} ({what}) is the only profile of this model that runs here{tail}"
    device = p.requires.device
    on_gpu = [c for c in found if c.runnable and c.profile.requires.device == "gpu"]
    if device == "gpu" and len(on_gpu) == 1:
        return f"no --optimize given: GPU profiles come first, and {p.id} ({what}) is the one{tail}"
    return (
        f"no --optimize given: {p.id} ({what}) runs the engine measured fastest for a single "
        f"user on this {device} (ranks: {', '.join(ENGINE_RANK[device])}){tail}"
    )
