"""llama.cpp's own `llama-server` as an inferd engine: GGUF files served directly.

Why `llama-server` (MIT, like llama.cpp) and not the Python bindings' server: it batches many
streams over parallel slots (continuous batching) in C++, while llama-cpp-python's server runs one
sequence at a time (see benchmarks/RESULTS.md). The binary is built from llama.cpp's source by
`make install` (`inferd.engines.llamacpp_build`), or taken from PATH.

Flags derived from the profile: the GGUF in the model folder (`-m`), `--parallel` slots (the
profile's `max_running`, so admission control never sends more requests than there are slots),
`--ctx-size` = context x slots (llama-server splits its KV cache evenly across slots), and the
device: `--device none` for CPU profiles, the profile's GPUs with every layer offloaded for GPU
profiles (which need a llama-server built with CUDA: `gpu_support`).
`--metrics` exposes Prometheus metrics (`llamacpp:*`), passed through by the front. llama-server
speaks OpenAI on /v1/*, but its tokenize/detokenize routes differ from vLLM's; `adapt` and
`adapt_answer` translate them so inferd's /v1/tokenize is the same whatever the engine.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferd.engines.base import Engine, EngineCommand, flags_from_mapping
from inferd.errors import EngineStartError

BINARY = "llama-server"
# llama-server's variable for `--cache-ram` (MiB of host memory for its prompt cache; 0: none).
PROMPT_CACHE_ENV = "LLAMA_ARG_CACHE_RAM"

# Request fields llama-server reads on its OpenAI routes: its own sampling schema
# (tools/server/server-schema.cpp) plus the OpenAI fields its chat/completion parsers take
# (server-common.cpp, server-chat.cpp), as of the vendored llama.cpp (commit 0c1e570). Others
# are ignored by llama-server; inferd refuses them by name.
_NATIVE = frozenset(
    {
        "adaptive_decay",
        "adaptive_target",
        "backend_sampling",
        "cache_prompt",
        "chat_format",
        "chat_parser",
        "dry_allowed_length",
        "dry_base",
        "dry_multiplier",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "dynatemp_exponent",
        "dynatemp_range",
        "frequency_penalty",
        "grammar",
        "grammar_lazy",
        "grammar_triggers",
        "ignore_eos",
        "json_schema",
        "logit_bias",
        "lora",
        "min_keep",
        "min_p",
        "mirostat",
        "mirostat_eta",
        "mirostat_tau",
        "n_cache_reuse",
        "n_discard",
        "n_indent",
        "n_keep",
        "n_predict",
        "n_probs",
        "post_sampling_probs",
        "presence_penalty",
        "repeat_last_n",
        "repeat_penalty",
        "return_progress",
        "return_tokens",
        "samplers",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "t_max_predict_ms",
        "t_max_prompt_ms",
        "temperature",
        "timings_per_token",
        "top_k",
        "top_n_sigma",
        "top_p",
        "typical_p",
        "xtc_probability",
        "xtc_threshold",
    }
)
_OPENAI = frozenset({"model", "max_tokens", "n", "logprobs", "top_logprobs", "response_format"})
ACCEPTED_PARAMS: dict[str, frozenset[str]] = {
    "/v1/chat/completions": _NATIVE
    | _OPENAI
    | {
        "messages",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "reasoning_format",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
    },
    "/v1/completions": _NATIVE | _OPENAI | {"prompt", "echo"},
    "/tokenize": frozenset({"model", "prompt", "add_special_tokens"}),
    "/detokenize": frozenset({"model", "tokens"}),
}


# llama-server's answer when a prompt does not fit a slot; it has counted the whole prompt.
_TOO_LONG = re.compile(
    rb"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)"
)


class _LegacyLogprobs:
    """llama-server answers /v1/completions logprobs in the chat shape (`content: [{token,
    logprob, top_logprobs}]`); OpenAI's completions API (and vLLM) use the legacy one (`tokens`,
    `token_logprobs`, `top_logprobs`, `text_offset`). One instance per answer: a stream's
    text offsets run on across its events."""

    def __init__(self) -> None:
        self.offset: dict[int, int] = {}

    def event(self, data: dict[str, Any]) -> dict[str, Any]:
        for choice in data.get("choices") or ():
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if not isinstance(logprobs, dict) or "content" not in logprobs:
                continue
            index = int(choice.get("index") or 0)
            items = logprobs["content"] or []
            offsets = []
            for item in items:
                offsets.append(self.offset.get(index, 0))
                self.offset[index] = offsets[-1] + len(item.get("token", ""))
            choice["logprobs"] = {
                "tokens": [item.get("token") for item in items],
                "token_logprobs": [item.get("logprob") for item in items],
                "top_logprobs": [
                    {top.get("token"): top.get("logprob") for top in item.get("top_logprobs", [])}
                    for item in items
                ],
                "text_offset": offsets,
            }
        return data


REBUILD = "python -m inferd.engines.llamacpp_build --prefix .venv --cuda on"


def gpu_support(binary: str, capabilities: tuple[tuple[int, int], ...] = ()) -> str | None:
    """Why this llama-server cannot serve GPU profiles on GPUs of these compute capabilities, or
    None when it can (built with ggml's CUDA backend for them). The stamp `make install` writes
    beside it says so; a llama-server from elsewhere is asked for its devices."""
    # Here, not at the top: `python -m inferd.engines.llamacpp_build` imports this package
    # first, and runpy warns when the module it runs is already imported.
    from inferd.engines import llamacpp_build

    bindir = Path(binary).parent
    if not (bindir / llamacpp_build.STAMP).is_file():
        try:
            info = Path(binary).stat()
        except OSError as exc:
            return f"cannot ask {binary} for its devices: {exc}"
        return _lists_no_cuda_device(binary, info.st_mtime_ns, info.st_size)
    cuda = (llamacpp_build.read_stamp(bindir) or {}).get("cuda")
    if not cuda:
        return f"llama-server was built without CUDA (`{REBUILD}` rebuilds it with CUDA)"
    built = {a.rstrip("abcdefghijklmnopqrstuvwxyz") for a in str(cuda).split(";")}
    missing = sorted({f"{m}.{n}" for m, n in capabilities if f"{m}{n}" not in built})
    if missing:
        return (
            f"llama-server was built for CUDA architectures {cuda}, not for compute "
            f"capability {', '.join(missing)} (`{REBUILD}` builds for the GPUs here)"
        )
    return None


@functools.cache
def _lists_no_cuda_device(binary: str, mtime_ns: int, size: int) -> str | None:
    """Asked once per binary (a replaced file is asked again): it starts the program, and CUDA
    where there is one."""
    try:
        done = subprocess.run(
            [binary, "--list-devices"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot ask {binary} for its devices: {exc}"
    if re.search(r"^\s*CUDA\d+:", done.stdout + done.stderr, re.MULTILINE):
        return None
    return f"{binary} lists no CUDA device (built without CUDA, or no driver)"


def find_binary() -> str | None:
    """llama-server next to this Python (where `make install` puts it), else on PATH."""
    beside = Path(sys.executable).with_name(BINARY)
    if beside.is_file():
        return str(beside)
    return shutil.which(BINARY)


def adapt_tool_choice(payload: dict[str, Any]) -> bool:
    """A chat request's `tool_choice` in the terms llama-server honours. Changes `payload` in
    place; True when it did (the front then re-encodes the body). Call it after
    `inferd.catalog.schema.tool_refusal` has accepted the request.

    - A named function (`{"type": "function", "function": {"name": N}}`): llama-server reads
      `tool_choice` only as a string, drops the object with a warning and runs the request as
      "auto". The same constraint in its terms: "required" over that one tool, one call.
    - "none": llama-server still renders the tools into the prompt (vLLM leaves them out, with
      `--exclude-tools-when-tool-choice-none`), and a model shown tools may write a call as
      text. The tools are left out here too.
    """
    choice = payload.get("tool_choice")
    tools = payload.get("tools")
    if choice == "none" and tools:
        del payload["tools"]
        del payload["tool_choice"]
        payload.pop("parallel_tool_calls", None)
        return True
    if not isinstance(choice, dict):
        return False
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not isinstance(tools, list):
        return False
    payload["tools"] = [
        t
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and t["function"].get("name") == name
    ]
    payload["tool_choice"] = "required"
    payload["parallel_tool_calls"] = False
    return True


class LlamaCppEngine(Engine):
    name = "llamacpp"
    version_path = "/props"
    # Its /tokenize reads text only; this route renders a chat request with the model's
    # template and counts it (`{"input_tokens": N}`).
    chat_tokens_path = "/v1/chat/completions/input_tokens"
    adapted_routes = frozenset({"/tokenize", "/detokenize"})
    # Each slot and whether it is busy; answered between (and during) decodes, so it shows a
    # cancelled request's slot freed once the batch that held it is done.
    working_path = "/slots"
    # vLLM's (and inferd's) names for sampling fields llama.cpp calls otherwise.
    param_aliases = {"repetition_penalty": "repeat_penalty", "max_completion_tokens": "max_tokens"}
    # llama-server's first chat request after its start took 45-50 ms longer than the next
    # (its own warm-up is an empty run): a one-token chat before readiness (50 ms more to
    # ready) halved the first user's first token through the front, 95 -> 45 ms on the Xeon
    # (benchmarks/first_request.py).
    warmup = (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
    )

    @property
    def slots(self) -> int:
        return self.profile.max_running

    def working(self, answer: Any) -> int | None:
        if not isinstance(answer, list):
            return None
        return sum(1 for slot in answer if isinstance(slot, dict) and slot.get("is_processing"))

    def accepted_params(self, route: str) -> frozenset[str] | None:
        accepted = ACCEPTED_PARAMS.get(route)
        return None if accepted is None else accepted | self.param_aliases.keys()

    def gguf(self) -> Path:
        found = sorted(self.model_dir.glob("*.gguf"))
        if found:
            return found[0]
        if not self.model_dir.exists():
            # Not prepared yet (`serve --dry-run` on an empty cache): name the folder's GGUF.
            return self.model_dir / "*.gguf"
        raise EngineStartError(f"no GGUF file in {self.model_dir}")

    def command(self, socket: Path) -> EngineCommand:
        binary = find_binary()
        if binary is None:
            raise EngineStartError(
                "llama-server is not installed: `make install` builds it from llama.cpp's source "
                "(or put a llama-server on PATH)"
            )
        argv = [
            binary,
            "--model",
            str(self.gguf()),
            "--alias",
            self.served_name,
            *self.listen_flags(socket),
            "--parallel",
            str(self.slots),
            "--ctx-size",
            str(self.context * self.slots),
            "--metrics",
            "--no-webui",
            *self._device_flags(binary),
            *self._tool_flags(),
            *self.adapter_flags(),
            *flags_from_mapping(self.profile.engine_args),
            *self.extra_args,
        ]
        # No host-memory prompt cache (`--cache-ram`, on by default in llama-server since late
        # 2025, up to 8 GiB): on every new request it copies the state of the prompt a slot gives
        # up into newly allocated memory, which inferd's memory estimate does not count, and
        # that costs the request before its prompt starts (4 ms alone on a 2-core Zen 4 VM, 24-41
        # ms beside a resting vLLM's 5 GB: benchmarks/RESULTS.md, "llama.cpp's prompt cache in
        # RAM"). Each slot still reuses its own last prompt. Through the environment, which
        # llama-servers older than the flag ignore; `--engine-args "llamacpp: --cache-ram N"` or
        # the variable in inferd's own environment brings it back.
        memory = {} if PROMPT_CACHE_ENV in os.environ else {PROMPT_CACHE_ENV: "0"}
        return EngineCommand(argv=argv, env={**memory, **self.profile.engine_env})

    def listen_flags(self, socket: Path) -> list[str]:
        # A `--host` ending in `.sock` is a Unix socket path (tools/server/server-http.cpp binds
        # it AF_UNIX and ignores the port); a later `--host` would replace the list, so
        # pass-through arguments may not give one (`listen_options`).
        if socket.suffix != ".sock":
            raise EngineStartError(f"llama-server listens on a socket path ending .sock: {socket}")
        return ["--host", str(socket)]

    def secret_env(self, secret: str) -> dict[str, str]:
        # `--api-key`'s variable (common/arg.cpp). llama-server then answers 401 on every route
        # but /health, /v1/health and its web UI's files (off here: --no-webui).
        return {"LLAMA_API_KEY": secret}

    def _tool_flags(self) -> list[str]:
        """The catalog's chat template for models whose own renders no tools. Jinja templates
        (which tools need) are llama-server's default at the vendored commit (`--jinja`,
        "default: enabled"); the flag is given anyway so an older build fails loudly instead of
        refusing `tools` per request ("tools param requires --jinja flag")."""
        tools = self.profile.tools
        if tools is None:
            return []
        flags = ["--jinja"]
        if tools.chat_template and set(tools.llamacpp) - {"none"}:
            # Only where llama.cpp honours more than "none": its template analysis then finds
            # the call format in it. For "none" alone the model's own template (no tools shown).
            flags += ["--chat-template", tools.chat_template]
        return flags

    def _device_flags(self, binary: str) -> list[str]:
        """Where the model runs. A CUDA build offloads to every GPU it sees by default: CPU
        profiles say `--device none`; GPU profiles name their GPUs (the profile's count, from
        the first; CUDA_VISIBLE_DEVICES chooses which) and put every layer there."""
        if self.profile.requires.device != "gpu":
            # Only CUDA builds need it, and llama-servers older than the flag refuse it.
            return ["--device", "none"] if gpu_support(binary) is None else []
        names = ",".join(f"CUDA{i}" for i in range(max(1, self.profile.gpus)))
        return ["--device", names, "--n-gpu-layers", "all"]

    # LoRA adapters: loaded at start only (llama-server has no API to add one), so
    # `server.adapters` drains and restarts the engine when the set changes.
    adapter_format = "gguf"

    def adapter_flags(self) -> list[str]:
        """Each adapter loaded with scale 0 (`--lora-scaled FILE:0`): a request without a `lora`
        field gets no adapter (llama-server gives such requests the start-up scales, and
        skips zero-scaled adapters). `--lora-init-without-apply` keeps the warm-up plain."""
        if not self.adapters:
            return []
        flags = ["--lora-init-without-apply"]
        for adapter in self.adapters:
            path = str(adapter.gguf)
            if "," in path or ":" in path:  # the flag's own separators
                raise EngineStartError(f"adapter path {path} contains ',' or ':'")
            flags += ["--lora-scaled", f"{path}:0"]
        return flags

    def use_adapter(self, payload: dict[str, Any], name: str) -> None:
        """llama-server's per-request `lora` field: this adapter at scale 1, every other one
        at 0 (adapters it does not list get 0). Requests with different adapter sets are not
        batched in one decoding step by llama-server; they take turns."""
        ids = [i for i, a in enumerate(self.adapters) if a.name == name]
        if not ids:
            raise EngineStartError(f"adapter {name} is not loaded in this llama-server")
        payload["lora"] = [{"id": ids[0], "scale": 1.0}]

    def use_base(self, payload: dict[str, Any]) -> bool:
        """Every adapter at scale 0, said explicitly. Without a `lora` field llama-server does
        get no adapter, but it then reuses a slot's cached prompt as it is, even one computed
        with an adapter (it clears the cache on an adapter change only when the request names
        its adapters): a base request would answer from the adapter's keys and values (seen:
        half the base model's answers in the adapter's format). A client's own `lora` field
        is replaced too: adapters are chosen by `model` only."""
        if not self.adapters:
            return False
        payload["lora"] = [{"id": i, "scale": 0.0} for i in range(len(self.adapters))]
        return True

    def parse_version(self, props: dict[str, Any]) -> str | None:
        info = props.get("build_info")
        return str(info) if info else None

    # llama-server answers these malformed requests with a 500 (seen in the adversarial suite:
    # a message without a role, a text part without text, a tool call without a type, a lone
    # UTF-16 surrogate, an image or audio for a text-only model): they are the client's errors.
    CLIENT_FAULTS = (
        b"Failed to parse messages",
        b"[json.exception.",
        b"image input is not supported",
        b"audio input is not supported",
    )

    def clients_fault(self, status: int, answer: bytes) -> bool:
        return status == 500 and any(marker in answer for marker in self.CLIENT_FAULTS)

    def adapt_request(self, route: str, payload: dict[str, Any]) -> bool:
        return route == "/v1/chat/completions" and adapt_tool_choice(payload)

    def adapt(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """inferd's (vLLM-shaped) tokenize/detokenize requests in llama-server's shape."""
        if route == "/tokenize":
            prompt = payload.get("prompt")
            return {
                "content": prompt if isinstance(prompt, str) else "",
                "add_special": bool(payload.get("add_special_tokens", True)),
            }
        return payload

    def prompt_too_long(self, body: bytes) -> tuple[int, int] | None:
        found = _TOO_LONG.search(body)
        return (int(found.group(1)), int(found.group(2))) if found else None

    def event_adapter(self, route: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        return _LegacyLogprobs().event if route == "/v1/completions" else None

    def adapt_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        if route == "/tokenize":
            tokens = answer.get("tokens", [])
            return {"count": len(tokens), "max_model_len": self.context, "tokens": tokens}
        if route == "/detokenize":
            return {"prompt": answer.get("content", "")}
        return answer
