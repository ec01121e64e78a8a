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
5. prefer the faster engine; within one engine, a profile measured faster on CPUs without a
   feature this CPU lacks too (`prefer_when_missing`), then the lower `priority`;
6. prefer the lower precision that keeps quality (fp8 before bf16 before int8/int4);
7. then fewer GPUs for throughput, more GPUs for latency.
Measured here beats measured elsewhere: where `inferd tune` (or `serve`, in the background) has
measured two or more runnable profiles of one device on this machine (`catalog.measured`), those
take the places the rules gave them in the order their figures give: one user's end-to-end time
for 128 in / 128 out (the default and `--optimize latency`), or the output rate at the
profile's `max_running` (`--optimize throughput`). For one user, files of one engine (its
quantisations) within `TIED` of its fastest for one user are then ordered among themselves by
one user's time plus that of four users arriving together (`_with_crowd`): one-user times that
close are within what a short benchmark on a shared machine can tell apart, where prompt times
(which every further user meets) differ by half and stably. On a 2-core Zen 3, tune's one-user
figures put Q4_1 and Q8_0 within 1-4% of each other, in either order from run to run, while
serving them gave Q8_0 16% more at one user and 30% more at four (benchmarks/RESULTS.md); on a
Zen 4, Q8_0 is 9% ahead for one user and stays first, though Q4_1 takes four users better.
Profiles not
measured keep their places, so an unmeasured vLLM profile still heads `--optimize throughput`.
The caller reads the figures and passes them in (`measured=`): this module does no I/O.
A profile named with `--profile` is honoured or refused with its reasons; `--force` runs it anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from inferd.catalog.estimate import Estimate, estimate
from inferd.catalog.hardware import Hardware
from inferd.catalog.measured import CROWD, TYPICAL_OUTPUT, TYPICAL_PROMPT, Measurement
from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import NoProfileError

RUNNABLE, SMALLER, INCOMPATIBLE = "runnable", "smaller-context", "incompatible"
# Files of one engine this close for one user are a tie that four users' time breaks.
TIED = 1.05
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
    # This CPU lacks a feature the profile's `prefer_when_missing` names: it ranks before the
    # other profiles of its engine (rule 5).
    preferred: bool = False

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
    found = _check(model, profile, hw, context, unavailable)
    missing = [f for f in profile.prefer_when_missing if f not in hw.cpu.features]
    return replace(found, preferred=True) if missing else found


def _check(
    model: ModelEntry,
    profile: Profile,
    hw: Hardware,
    context: int | None,
    unavailable: Mapping[str, str] | None,
) -> Candidate:
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
        int(not c.preferred),
        p.priority,
        PRECISION_RANK.get(p.precision, 9),
        p.gpus if goal == "throughput" else -p.gpus,
    )


def _with_crowd(m: Measurement, profile: Profile) -> float:
    """Between files of one engine, for one user: one user's time and `CROWD`'s together."""
    return m.single_user_ms() + m.together_ms(min(CROWD, profile.max_running))


def _files_order(files: list[Candidate], figures: Mapping[str, Measurement]) -> list[Candidate]:
    """One engine's files for one user: those within `TIED` of the fastest for one user by
    `_with_crowd`, then the others by one user's time."""
    alone = {c.profile.id: figures[c.profile.id].single_user_ms() for c in files}
    best = min(alone.values())

    def key(c: Candidate) -> tuple[int, float]:
        if alone[c.profile.id] <= best * TIED:
            return 0, _with_crowd(figures[c.profile.id], c.profile)
        return 1, alone[c.profile.id]

    return sorted(files, key=key)


def _score(m: Measurement, profile: Profile, optimize: str | None) -> float:
    """Lower is better: one user's 128 in / 128 out time, or minus the rate at the profile's
    own concurrency limit for throughput."""
    if optimize == "throughput":
        return -m.rate(profile.max_running)
    return m.single_user_ms()


def usable(
    found: list[Candidate], measured: Mapping[str, Measurement] | None
) -> dict[str, Measurement]:
    """The measurements of runnable candidates (of the same engine: a catalog that changed a
    profile's engine makes its old figures meaningless)."""
    engines = {c.profile.id: c.profile.engine for c in found if c.runnable}
    return {pid: m for pid, m in (measured or {}).items() if engines.get(pid) == m.engine}


def ranked(
    found: list[Candidate],
    optimize: str | None,
    measured: Mapping[str, Measurement] | None = None,
) -> list[Candidate]:
    """The runnable candidates, best first: by the rules (`rank_key`), then, on each device
    where two or more were measured here, those reordered among their own places by figures."""
    order = sorted((c for c in found if c.runnable), key=lambda c: rank_key(c, optimize))
    figures = usable(found, measured)
    for device in ("gpu", "cpu"):
        places = [
            i
            for i, c in enumerate(order)
            if c.profile.requires.device == device and c.profile.id in figures
        ]
        if len(places) < 2:
            continue
        by_figure = sorted(
            (order[i] for i in places),
            key=lambda c: _score(figures[c.profile.id], c.profile, optimize),
        )
        for i, c in zip(places, by_figure, strict=True):
            order[i] = c
        if optimize == "throughput":
            continue
        for engine in {order[i].profile.engine for i in places}:
            mine = [i for i in places if order[i].profile.engine == engine]
            files = _files_order([order[i] for i in mine], figures)
            for i, c in zip(mine, files, strict=True):
                order[i] = c
    return order


def by_measurement(
    chosen: Candidate, found: list[Candidate], measured: Mapping[str, Measurement] | None
) -> bool:
    """Whether figures measured here put `chosen` where it is (it and another runnable profile
    of its device were measured)."""
    figures = usable(found, measured)
    device = chosen.profile.requires.device
    peers = [c for c in found if c.runnable and c.profile.requires.device == device]
    return chosen.profile.id in figures and sum(c.profile.id in figures for c in peers) >= 2


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
    measured: Mapping[str, Measurement] | None = None,
) -> Candidate:
    """The profile to run: `wanted` by id, or the best runnable one for `default`.
    `found`: this model's `candidates` on `hw`, when the caller has them already;
    `measured`: this machine's figures for the model, by profile id (`measured.load`)."""
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
    runnable = ranked(found, optimize, measured)
    if runnable:
        return runnable[0]
    detail = "; ".join(f"{c.profile.id}: {c.reason}" for c in found)
    raise NoProfileError(
        f"no profile of {model.id} runs on this machine ({hw.summary()}): {detail}"
    )


def best_by_goal(
    found: list[Candidate], measured: Mapping[str, Measurement] | None = None
) -> dict[str, str]:
    """The profile each `--optimize` goal would pick among the runnable ones."""
    runnable = [c for c in found if c.runnable]
    picks: dict[str, str] = {}
    for goal in ("latency", "throughput"):
        # What `select` would do with the goal (a GPU profile still comes first), as long as
        # some runnable profile is made for the goal at all.
        if any(c.profile.optimize == goal for c in runnable):
            picks[goal] = ranked(found, goal, measured)[0].profile.id
    return picks


def figures(m: Measurement, profile: Profile, optimize: str | None) -> str:
    """A measurement in the terms of a goal, for a sentence."""
    if optimize == "throughput":
        return f"{m.rate(profile.max_running):.0f} tok/s at {profile.max_running} running"
    crowd = min(CROWD, profile.max_running)
    return (
        f"{TYPICAL_PROMPT} in / {TYPICAL_OUTPUT} out in {m.single_user_ms() / 1000:.2f} s "
        f"(first token {m.prompt_time(TYPICAL_PROMPT):.0f} ms, {m.rate(1):.0f} tok/s), "
        f"{crowd} at once in {m.together_ms(crowd) / 1000:.2f} s"
    )


def _measured_why(
    chosen: Candidate,
    found: list[Candidate],
    optimize: str | None,
    measured: Mapping[str, Measurement],
) -> str:
    figures_here = usable(found, measured)
    device = chosen.profile.requires.device
    order = [c for c in ranked(found, optimize, measured) if c.profile.requires.device == device]
    compared = [c for c in order if c.profile.id in figures_here]
    goal = f"--optimize {optimize}" if optimize else "no --optimize given"
    what = (
        "highest output rate"
        if optimize == "throughput"
        else "fastest for one user (files of one engine within 5%: with four users too)"
    )
    parts = [
        f"{c.profile.id} {figures(figures_here[c.profile.id], c.profile, optimize)}"
        for c in compared
    ]
    text = (
        f"{goal}: measured on this machine ({figures_here[chosen.profile.id].date}): "
        f"{chosen.profile.id} is the {what}: {'; '.join(parts)}"
    )
    unmeasured = [c.profile.id for c in order if c.profile.id not in figures_here]
    if unmeasured:
        text += f" (not measured: {', '.join(unmeasured)})"
    return text


def explain(
    chosen: Candidate,
    found: list[Candidate],
    optimize: str | None,
    measured: Mapping[str, Measurement] | None = None,
    *,
    model: str = "MODEL",
) -> str:
    """Why `select` picked `chosen`, in one sentence a user can act on; it says whether
    figures measured here decided, or the catalog's rules (and how to measure: `inferd tune`)."""
    p = chosen.profile
    picks = best_by_goal(found, measured)
    others = [f"--optimize {goal} picks {pid}" for goal, pid in picks.items() if pid != p.id]
    tail = f"; {', '.join(others)}" if others else ""
    if sum(c.runnable for c in found) <= 1:
        return _by_rules(chosen, found, optimize, tail)
    if measured and by_measurement(chosen, found, measured):
        return _measured_why(chosen, found, optimize, measured) + tail
    return (
        f"{_by_rules(chosen, found, optimize, tail)}; by the catalog's rules (not measured "
        f"here: `inferd tune {model}`)"
    )


def _by_rules(chosen: Candidate, found: list[Candidate], optimize: str | None, tail: str) -> str:
    p = chosen.profile
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
    if chosen.preferred:
        return (
            f"no --optimize given: {p.id} ({what}) runs the engine measured fastest for a single "
            f"user on this {device} (ranks: {', '.join(ENGINE_RANK[device])}), and of its "
            f"profiles the one measured faster on CPUs without "
            f"{'/'.join(p.prefer_when_missing)}{tail}"
        )
    return (
        f"no --optimize given: {p.id} ({what}) runs the engine measured fastest for a single "
        f"user on this {device} (ranks: {', '.join(ENGINE_RANK[device])}){tail}"
    )
