"""Engines: how to start each real inference engine from a profile, and how to reach it."""

from inferd.catalog.schema import Profile
from inferd.engines.base import Engine, EngineCommand
from inferd.engines.vllm import VllmEngine

ENGINES: dict[str, type[Engine]] = {VllmEngine.name: VllmEngine}


def engine_for(profile: Profile) -> type[Engine]:
    return ENGINES[profile.engine]


__all__ = ["ENGINES", "Engine", "EngineCommand", "VllmEngine", "engine_for"]
