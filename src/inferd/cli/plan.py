"""Resolve what `inferd serve` would run, without side effects: shared by serve, --dry-run,
`inferd profiles` and `inferd cache pull`.

A `Plan` is the catalog entry, the hardware (live or captured), the chosen profile with its memory
estimate, the context served, and where in the cache the model folder lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inferd import engines
from inferd.cache import ModelStore
from inferd.cache.prepare import variant
from inferd.catalog import Catalog, hardware, profiles
from inferd.catalog.estimate import Estimate, GiB
from inferd.catalog.hardware import Hardware
from inferd.catalog.profiles import Candidate
from inferd.catalog.schema import ModelEntry
from inferd.config import Settings
from inferd.engines import Engine, engine_for
from inferd.errors import UsageError


@dataclass(frozen=True)
class Plan:
    entry: ModelEntry
    hardware: Hardware
    chosen: Candidate
    store: ModelStore
    why: str  # why this profile, in a sentence (shown by serve and --dry-run)

    @property
    def context(self) -> int:
        return self.chosen.estimate.context if self.chosen.estimate else self.chosen.profile.context

    @property
    def model_dir(self) -> Path:
        return self.store.model_dir(self.entry.id, variant(self.chosen.profile))

    def engine(self, settings: Settings, model_dir: Path | None = None) -> Engine:
        profile = self.chosen.profile
        if settings.max_running is not None:
            # Engines with a fixed number of sequence slots (llama-server) get one per request
            # admission control lets through: no slot idles, no admitted request waits inside.
            profile = profile.model_copy(update={"max_running": settings.max_running})
        return engine_for(profile)(
            self.entry.id,
            model_dir or self.model_dir,
            profile,
            settings.engine_argv(),
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


def resolve(
    settings: Settings,
    model_id: str | None = None,
    *,
    profile: str | None = None,
    hw: Hardware | None = None,
    entry: ModelEntry | None = None,
) -> Plan:
    entry = entry or catalog(settings).get(model_id or settings.models[0])
    hw = hw or hardware.detect(settings.hardware)
    wanted = profile or settings.profile
    optimize = None if settings.optimize == "auto" else settings.optimize
    found = profiles.candidates(
        entry, hw, settings.max_model_len, unavailable_engines(settings, hw)
    )
    chosen = profiles.select(
        entry, hw, wanted, optimize=optimize, force=settings.force, found=found
    )
    if wanted != "default":
        why = f"--profile {wanted} asked for it"
    else:
        why = profiles.explain(chosen, found, optimize)
    return Plan(entry, hw, chosen, ModelStore(settings.cache_path), why)


def resolve_all(settings: Settings) -> list[Plan]:
    """One plan per model served, each with its own profile, checked to fit in memory together."""
    ids = settings.models
    if len(set(ids)) != len(ids):
        raise UsageError(f"a model is named twice: {', '.join(ids)}")
    if len(ids) > 1:
        # Engines differ in their flags and models in their context: these name one model.
        for flag, value in (
            ("--engine-args", settings.engine_args),
            ("--max-model-len", settings.max_model_len),
        ):
            if value:
                raise UsageError(
                    f"{flag} applies to one model and {len(ids)} are served; serve that model "
                    "on its own, or give its profile the setting (a catalog file, --catalog-path)"
                )
    cat = catalog(settings)
    entries = [cat.get(i) for i in ids]
    wanted = profile_choices(settings.profile, entries)
    hw = hardware.detect(settings.hardware)
    plans = [resolve(settings, profile=wanted[e.id], hw=hw, entry=e) for e in entries]
    if len(plans) > 1 and not settings.force:
        check_fit_together(plans)
    return plans


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
        owners = [e.id for e in entries if any(p.id == profile for p in e.profiles)]
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
        if plan.chosen.estimate is not None:
            on = plan.chosen.profile.requires.device
            by_device.setdefault(on, []).append((plan, plan.chosen.estimate))
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
