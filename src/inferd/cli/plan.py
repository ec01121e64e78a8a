"""Resolve what `inferd serve` would run: shared by serve, --dry-run, `inferd profiles` and
`inferd cache pull`.

A `Plan` is the catalog entry, the hardware (live or captured), the chosen profile with its memory
estimate, the context served, and where in the cache the model folder lives. A model is named by
its catalog id, or given by path (a GGUF file, a Hugging Face folder) or as `hf://ORG/NAME@REV`:
then its entry is generated from the files (`catalog.local_model`) and kept in the cache
(`cache.local`); reading and hashing the files is the only work resolving does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from inferd import engines
from inferd.cache import ModelStore
from inferd.cache.local import entry_for, fetch_hub
from inferd.cache.prepare import variant
from inferd.catalog import Catalog, combined, hardware, measured, profiles
from inferd.catalog.estimate import Estimate, GiB
from inferd.catalog.hardware import Hardware
from inferd.catalog.local_model import model_id_for
from inferd.catalog.profiles import Candidate
from inferd.catalog.schema import Combined, ModelEntry, Profile
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.engines import Engine, engine_for
from inferd.errors import ConfigError, NoProfileError, UnknownModelError, UsageError

HUB = "hf://"
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


@dataclass(frozen=True)
class Plan:
    entry: ModelEntry
    hardware: Hardware
    chosen: Candidate
    store: ModelStore
    why: str  # why this profile, in a sentence (shown by serve and --dry-run)
    # For a model given by path whose files are a catalog model's: which (the better path).
    note: str = ""
    # A combined profile (several engines behind the model): it, and each engine's profile in
    # start order (`chosen` is the first).
    combined: Combined | None = None
    parts: tuple[Candidate, ...] = ()

    @property
    def context(self) -> int:
        return self.chosen.estimate.context if self.chosen.estimate else self.chosen.profile.context

    @property
    def profile_id(self) -> str:
        return self.combined.id if self.combined else self.chosen.profile.id

    @property
    def engines_run(self) -> tuple[Candidate, ...]:
        """Every profile this plan runs an engine for, the first engine first."""
        return self.parts or (self.chosen,)

    @property
    def model_dir(self) -> Path:
        return self.store.model_dir(self.entry.id, variant(self.chosen.profile))

    def engine(
        self, settings: Settings, model_dir: Path | None = None, profile: Profile | None = None
    ) -> Engine:
        """The engine for `profile` (default: the chosen one), its model in `model_dir`."""
        profile = profile or self.chosen.profile
        if model_dir is None:
            model_dir = self.store.model_dir(self.entry.id, variant(profile))
        if settings.max_running is not None:
            # Engines with a fixed number of sequence slots (llama-server) get one per request
            # admission control lets through: no slot idles, no admitted request waits inside.
            profile = profile.model_copy(update={"max_running": settings.max_running})
        return engine_for(profile)(
            self.entry.id,
            model_dir,
            profile,
            settings.engine_argv(profile.engine),
            self.store.engine_dir(profile.engine),
            self.context,
        )


def unavailable_engines(settings: Settings, hw: Hardware) -> dict[str, str] | None:
    """Engines missing on this machine; None for captured hardware (another machine's)."""
    if settings.hardware is not None:
        return None
    return engines.unavailable(tuple(g.compute_capability for g in hw.gpus))


def catalog(settings: Settings) -> Catalog:
    return Catalog.load(extra=settings.catalog_path)


def looks_like_path(ref: str) -> bool:
    """A model reference that is not a catalog id: a path (with a separator, a `.gguf` name, a
    `~`, or a file or folder that exists here) or a hub reference."""
    return (
        ref.startswith((HUB, "~", "."))
        or "/" in ref
        or ref.lower().endswith(".gguf")
        or Path(ref).exists()
    )


def model_entry(settings: Settings, ref: str, cat: Catalog | None = None) -> ModelEntry:
    """The entry for a catalog id, or the generated one for a model given by path or `hf://`.
    A catalog id wins over a file or folder of the same name in the working directory (write
    `./NAME` for the file)."""
    cat = cat or catalog(settings)
    ids = {e.id for e in cat}
    if ref in ids or not looks_like_path(ref):
        if settings.served_model_name:
            raise UsageError(
                f"--served-model-name names a model served by path; {ref} is a catalog model "
                "and keeps its id"
            )
        try:
            return cat.get(ref)
        except UnknownModelError as exc:
            raise UnknownModelError(
                f"{exc.message}; or give a path to a GGUF file or a Hugging Face model folder"
            ) from None
    store = ModelStore(settings.cache_path)
    if ref.startswith(HUB):
        repo, _, revision = ref.removeprefix(HUB).partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise UsageError(f"{ref}: a hub model is hf://ORG/NAME or hf://ORG/NAME@REVISION")
        path = fetch_hub(repo, revision, store, offline=settings.offline)
        derived = model_id_for(Path(repo))
    else:
        path = Path(ref).expanduser().absolute()
        derived = model_id_for(path)
    model_id = settings.served_model_name or derived
    if not MODEL_ID.match(model_id):
        raise UsageError(
            f"--served-model-name {model_id!r}: a model id is lower-case letters, digits, "
            "dots and dashes, starting with a letter or digit"
        )
    if model_id in ids:
        raise UsageError(
            f"{ref} would be served as {model_id!r}, a catalog model's id; choose another "
            "name with --served-model-name"
        )
    return entry_for(path, store, model_id, RichReporter(Console(stderr=True, highlight=False)))


def catalog_match(entry: ModelEntry, cat: Catalog) -> str:
    """For a model given by path: the catalog model whose source ships the same file (by
    sha256), said as a suggestion; "" when none does (or the model is a catalog one)."""
    local = {f.sha256 for s in entry.sources if s.kind == "local" for f in s.files}
    if not local:
        return ""
    for other in cat:
        for source in other.sources:
            same = [f.path for f in source.files if f.sha256 in local and f.role == "weights"]
            if same:
                return (
                    f"{same[0]} is the catalog model {other.id}'s own file (source "
                    f"{source.id}): `inferd serve {other.id}` runs it with its measured "
                    "profiles and pinned sources"
                )
    return ""


def resolve(
    settings: Settings,
    model_id: str | None = None,
    *,
    profile: str | None = None,
    hw: Hardware | None = None,
    entry: ModelEntry | None = None,
) -> Plan:
    cat = catalog(settings)
    entry = entry or model_entry(settings, model_id or settings.models[0], cat)
    hw = hw or hardware.detect(settings.hardware)
    wanted = profile or settings.profile
    optimize = None if settings.optimize == "auto" else settings.optimize
    found = profiles.candidates(
        entry, hw, settings.max_model_len, unavailable_engines(settings, hw)
    )
    store, note = ModelStore(settings.cache_path), catalog_match(entry, cat)
    figures = measured.load(store, measured.fingerprint(hw), entry.id)
    pick = _pick(entry, hw, figures)
    combo = entry.combination(wanted)
    if combo is not None:
        parts = combined.parts(combo, found, pick)
        why = f"--profile {wanted} asked for it: {combined.describe(combo, parts)}"
        return Plan(entry, hw, parts[0], store, why, note, combo, tuple(parts))
    chosen = profiles.select(
        entry, hw, wanted, optimize=optimize, force=settings.force, found=found, measured=figures
    )
    if wanted != "default":
        why = f"--profile {wanted} asked for it"
    else:
        why = profiles.explain(chosen, found, optimize, figures, model=entry.id)
        default = _default_combination(entry, chosen, found, optimize, pick)
        if default is not None:
            combo, parts = default
            why = (
                f"no --optimize given: {combined.describe(combo, parts)}, both engines behind "
                f"one model (a single user on {parts[0].profile.engine}, a crowd spills over "
                f"to {parts[-1].profile.engine}); --optimize latency or throughput pins one "
                f"engine. Each engine's profile: {why}"
            )
            return Plan(entry, hw, parts[0], store, why, note, combo, tuple(parts))
    return Plan(entry, hw, chosen, store, why, note)


def _pick(
    entry: ModelEntry, hw: Hardware, figures: Mapping[str, measured.Measurement]
) -> combined.Pick:
    """Each engine's profile for a combination: as `select` ranks them (measured here first)."""

    def pick(found: list[Candidate], goal: str) -> Candidate:
        return profiles.select(entry, hw, optimize=goal, found=found, measured=figures)

    return pick


def _default_combination(
    entry: ModelEntry,
    chosen: Candidate,
    found: list[Candidate],
    optimize: str | None,
    pick: combined.Pick,
) -> tuple[Combined, list[Candidate]] | None:
    """The combined profile the default runs instead of `chosen`, if any: one marked `default`
    in the catalog, with no --optimize, on the device the single best profile runs on, where
    every engine of it can run here and all fit together."""
    if optimize is not None:
        return None
    for combo in entry.combined:
        if not combo.default or combo.device != chosen.profile.requires.device:
            continue
        try:
            parts = combined.parts(combo, found, pick)
        except NoProfileError:
            continue
        estimates = [p.estimate for p in parts if p.estimate is not None]
        if estimates and sum(e.total for e in estimates) > estimates[0].available:
            continue  # each engine fits alone, not both (the default stays one engine)
        return combo, parts
    return None


def resolve_all(settings: Settings) -> list[Plan]:
    """One plan per model served, each with its own profile, checked to fit in memory together."""
    ids = settings.models
    if len(set(ids)) != len(ids):
        raise UsageError(f"a model is named twice: {', '.join(ids)}")
    # Checked here, once, rather than in `config`, which does not know the engines.
    unknown = sorted(set(settings.engine_arg_sections()) - {"", *engines.ENGINES})
    if unknown:
        raise ConfigError(
            f"INFERD_ENGINE_ARGS / --engine-args: {unknown[0]}: names no engine "
            f"(engines: {', '.join(sorted(engines.ENGINES))})"
        )
    if len(ids) > 1:
        # Engines differ in their flags and models in their context: these name one model.
        # `--engine-args` in an engine's section (`vllm: --enforce-eager`) names that engine,
        # every model's: only arguments outside any section are refused here.
        for flag, value in (
            ("--engine-args", settings.engine_arg_sections()[""]),
            ("--max-model-len", settings.max_model_len),
            ("--served-model-name", settings.served_model_name),
        ):
            if value:
                raise UsageError(
                    f"{flag} applies to one model and {len(ids)} are served; serve that model "
                    "on its own, or give its profile the setting (a catalog file, --catalog-path)"
                )
    cat = catalog(settings)
    entries = [model_entry(settings, i, cat) for i in ids]
    if len({e.id for e in entries}) != len(entries):
        raise UsageError(
            f"two of the models would be served under one id ({', '.join(e.id for e in entries)})"
            "; serve them apart, or rename one (a copy, or --served-model-name when serving one)"
        )
    wanted = profile_choices(settings.profile, entries)
    hw = hardware.detect(settings.hardware)
    plans = [resolve(settings, profile=wanted[e.id], hw=hw, entry=e) for e in entries]
    if len(plans) > 1 and not settings.force:
        # On demand, only the pinned models run together for sure; the others are checked
        # (and room made) as each loads (`server.loading`).
        pinned = [p for p in plans if p.entry.id in settings.pinned]
        check_fit_together(pinned if settings.on_demand else plans)
    return plans


def fit_check(plans: list[Plan]) -> Callable[[list[str]], str | None]:
    """For models on demand: why a set of these models does not fit in memory together (the
    same estimate as `check_fit_together`), or None when it does."""
    by_id = {p.entry.id: p for p in plans}

    def why_not(ids: list[str]) -> str | None:
        try:
            check_fit_together([by_id[i] for i in ids])
        except UsageError as exc:
            return str(exc)
        return None

    return why_not


def profile_choices(text: str, entries: list[ModelEntry]) -> dict[str, str]:
    """`--profile` for each model: `default`, a profile id (with one model, or naming a profile
    only one of the models has), or `MODEL=PROFILE` pairs separated by commas."""
    chosen = {e.id: "default" for e in entries}
    if text == "default":
        return chosen
    if len(entries) == 1 and "=" not in text:
        return {entries[0].id: text}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        model, _, profile = item.rpartition("=")
        if model:
            if model not in chosen:
                raise UsageError(
                    f"--profile names {model!r}, which is not served here "
                    f"(serving {', '.join(chosen)})"
                )
            chosen[model] = profile
            continue
        owners = [
            e.id
            for e in entries
            if any(p.id == profile for p in e.profiles) or e.combination(profile) is not None
        ]
        if len(owners) != 1:
            raise UsageError(
                f"--profile {profile!r} belongs to {'none' if not owners else 'more than one'} of "
                f"the models served ({', '.join(chosen)}); write MODEL=PROFILE"
            )
        chosen[owners[0]] = profile
    return chosen


# What several GPU engines may claim of one GPU together (the rest: CUDA contexts, fragmentation).
MAX_GPU_SHARE = 0.95


def check_fit_together(plans: list[Plan]) -> None:
    """Refuse, with the estimate, models whose engines would not fit in memory side by side.

    Each profile was checked alone; together, the models on the host (CPU profiles) share host
    memory and those on GPUs share the smallest GPU's usable memory (engines here run one per
    GPU set, so models on GPUs add up on every device they use).
    """
    by_device: dict[str, list[tuple[Plan, Estimate]]] = {}
    for plan in plans:
        for part in plan.engines_run:  # a combined profile's engines all take room
            if part.estimate is not None:
                on = part.profile.requires.device
                by_device.setdefault(on, []).append((plan, part.estimate))
    for device, group in by_device.items():
        if len(group) < 2:
            continue
        if device == "gpu":
            # Each GPU engine claims its profile's share of the device up front (vLLM's
            # gpu_memory_utilization), whatever its estimate: the shares must add up.
            share = sum(p.chosen.profile.gpu_memory_utilization for p, _ in group)
            if share > MAX_GPU_SHARE:
                parts = ", ".join(
                    f"{p.entry.id} {p.chosen.profile.gpu_memory_utilization:g}" for p, _ in group
                )
                raise UsageError(
                    f"these models' engines would claim {share:.2f} of each GPU together "
                    f"({parts}); at most {MAX_GPU_SHARE:g} can be shared: serve fewer models per "
                    "GPU, choose profiles with smaller shares (a catalog file, --catalog-path), "
                    "or --force"
                )
        need = sum(e.total for _, e in group)
        available = min(e.available for _, e in group)
        if need > available:
            parts = ", ".join(
                f"{p.entry.id} ({p.chosen.profile.id}) {e.total / GiB:.1f}" for p, e in group
            )
            where = "host memory" if device == "cpu" else "memory on each GPU"
            raise UsageError(
                f"these models do not fit in {where} together: they need {need / GiB:.1f} GiB "
                f"({parts} GiB), {available / GiB:.1f} GiB usable; serve fewer models, choose "
                "smaller profiles (--profile MODEL=PROFILE), or --force"
            )
