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
from inferd.catalog.hardware import Hardware
from inferd.catalog.profiles import Candidate
from inferd.catalog.schema import ModelEntry
from inferd.config import Settings
from inferd.engines import Engine, engine_for


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


def unavailable_engines(settings: Settings) -> dict[str, str] | None:
    """Engines missing on this machine; None for captured hardware (another machine's)."""
    return engines.unavailable() if settings.hardware is None else None


def catalog(settings: Settings) -> Catalog:
    return Catalog.load(extra=settings.catalog_path)


def resolve(settings: Settings, model_id: str | None = None) -> Plan:
    entry = catalog(settings).get(model_id or settings.model)
    hw = hardware.detect(settings.hardware)
    optimize = None if settings.optimize == "auto" else settings.optimize
    found = profiles.candidates(entry, hw, settings.max_model_len, unavailable_engines(settings))
    chosen = profiles.select(
        entry,
        hw,
        settings.profile,
        optimize=optimize,
        force=settings.force,
        found=found,
    )
    if settings.profile != "default":
        why = f"--profile {settings.profile} asked for it"
    else:
        why = profiles.explain(chosen, found, optimize)
    return Plan(entry, hw, chosen, ModelStore(settings.cache_path), why)
