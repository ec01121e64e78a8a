"""The common shape of an engine: how to start it from a profile, and how to talk to it.

An engine is a real inference server run as its own process (vLLM's OpenAI server, llama.cpp's
server, ...). inferd never imports an engine's Python package; it builds the engine's command line
from the profile, then speaks HTTP to it over a Unix socket in a private folder, never a TCP port
(`server.engine_link` says why). One subclass per engine in this package; `server.supervisor`
starts and watches the process, `server.engine_client` sends it requests.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.catalog.schema import Profile
from inferd.errors import ConfigError


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as an engine loads it: its id, its PEFT folder in the cache, and its
    GGUF form there (llama.cpp)."""

    name: str
    folder: Path
    gguf: Path


@dataclass(frozen=True)
class LoraLimits:
    """What a service with adapters allows: the largest rank, and (vLLM) how many adapters one
    batch may mix."""

    max_rank: int
    max_loras: int


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def flags_from_mapping(args: dict[str, str | int | float | bool]) -> list[str]:
    """`{"max-model-len": 4096, "enforce-eager": True}` becomes
    `--max-model-len 4096 --enforce-eager`; `False` leaves the flag out."""
    argv: list[str] = []
    for name, value in args.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not False:
            argv += [f"--{name}", str(value)]
    return argv


class Engine(ABC):
    """One engine process serving one model under its public id."""

    name: str = ""
    # Routes on the engine's own server.
    health_path = "/health"
    metrics_path = "/metrics"
    version_path = "/version"
    # Most choices (`n`) one request may ask for.
    max_n = 16
    # Routes whose requests and answers differ from inferd's (vLLM-shaped) API: see `adapt`.
    adapted_routes: frozenset[str] = frozenset()
    # Request fields this engine knows under another name (inferd's name -> the engine's).
    param_aliases: dict[str, str] = {}
    # The route that counts a chat request's prompt tokens (`messages`, `tools`) as the
    # model's template renders them: answers `count` or `input_tokens`.
    chat_tokens_path = "/tokenize"
    # The route that says how many requests the engine is working on now (`working`); None:
    # the engine does not say.
    working_path: str | None = None
    # A small request the supervisor sends once the engine answers its health route and before
    # it calls it ready (route, body), for an engine whose first request is slower than the
    # next: the first user then does not pay for it. None: the engine warms itself up.
    warmup: tuple[str, dict[str, Any]] | None = None
    # Flags that say where the engine listens: `listen_flags` sets them, and pass-through
    # arguments may not (a TCP address would open the engine to every local process).
    listen_options: frozenset[str] = frozenset({"--host", "--port", "--uds"})

    def __init__(
        self,
        served_name: str,
        model_dir: Path,
        profile: Profile,
        extra_args: list[str],
        cache_dir: Path,
        context: int | None = None,
    ) -> None:
        self.served_name = served_name
        self.model_dir = model_dir
        self.profile = profile
        # Where the engine keeps its own caches (compiled kernels...), inside inferd's cache so
        # one volume holds everything and a restart finds its warm-up work done.
        self.cache_dir = cache_dir
        # The context served: the profile's, or a smaller one the user asked for.
        self.context = context or profile.context
        # Pass-through arguments come last so they override the profile's (argparse: last wins).
        taken = [a for a in extra_args if a.split("=", 1)[0] in self.listen_options]
        if taken:
            raise ConfigError(
                f"INFERD_ENGINE_ARGS / --engine-args: {taken[0].split('=', 1)[0]} is inferd's to "
                "set (the engine listens on a Unix socket only inferd can open, never on a port)"
            )
        self.extra_args = extra_args

    @abstractmethod
    def command(self, socket: Path) -> EngineCommand:
        """The full command line and environment that start this engine serving HTTP on the
        Unix socket `socket` (through `listen_flags`), and on no TCP port."""

    @abstractmethod
    def listen_flags(self, socket: Path) -> list[str]:
        """The flags that make the engine listen on the Unix socket `socket` and nowhere else.
        The supervisor picks a new path per start, in a folder of mode 0700, ending `.sock`."""

    @abstractmethod
    def secret_env(self, secret: str) -> dict[str, str]:
        """The environment that makes the engine require `secret` (`Authorization: Bearer`) on
        the routes inferd forwards to. The supervisor picks a fresh secret per start, so no
        other local process can call the engine around the front's keys, limits and rails.
        Through the environment, never the command line, where `ps` shows it."""

    def accepted_params(self, route: str) -> frozenset[str] | None:
        """Request fields the engine honours on `route` (None: the front does not check)."""
        return None

    def parse_version(self, answer: dict[str, Any]) -> str | None:
        """The engine's version from the answer of its `version_path`."""
        version = answer.get("version")
        return str(version) if version else None

    def adapt_request(self, route: str, payload: dict[str, Any]) -> bool:
        """Put a request the front has accepted into the terms this engine honours, in place
        (e.g. a `tool_choice` form it would otherwise drop); True when it changed anything."""
        return False

    def working(self, answer: Any) -> int | None:
        """How many requests the engine is working on, from the answer of its `working_path`
        (None: the answer does not say)."""
        return None

    def clients_fault(self, status: int, answer: bytes) -> bool:
        """True when this engine's server error (`status` >= 500) is really about the request
        (a 400 to the client, not a 502)."""
        return False

    def adapt(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A request for one of `adapted_routes`, in the engine's own shape."""
        return payload

    def adapt_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        """The engine's answer on one of `adapted_routes`, in inferd's shape."""
        return answer

    def event_adapter(self, route: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """What reshapes each streamed event on `route` into inferd's shape, and a whole
        answer too (its choices have the events' shape); None: nothing to reshape."""
        return None

    def prompt_too_long(self, body: bytes) -> tuple[int, int] | None:
        """(prompt tokens, context) when an error answer says the prompt did not fit and the
        engine counted the whole prompt; None otherwise (the front then counts it itself)."""
        return None

    # ------------------------------------------------------------------ LoRA adapters
    # Set by `server.adapters` when the service serves adapters (INFERD_LORA_PATH): the limits,
    # and the adapters this engine loads at its next start. Class defaults: none.
    lora: LoraLimits | None = None
    adapters: tuple[Adapter, ...] = ()
    # Whether adapters can be added to a running engine (vLLM's load API), or only at a start
    # (llama-server: `server.adapters` drains and restarts it).
    runtime_adapters = False
    # Whether the engine loads adapters as GGUF files (made by llama.cpp's converter).
    adapter_format = "peft"

    def adapter_flags(self) -> list[str]:
        """The command-line flags that load `adapters` (and allow them at all)."""
        return []

    def adapter_env(self) -> dict[str, str]:
        return {}

    def use_adapter(self, payload: dict[str, Any], name: str) -> None:
        """Make `payload` (a request for the base model's engine) run with adapter `name`, in
        place."""
        raise NotImplementedError(f"{self.name} serves no adapters")

    def use_base(self, payload: dict[str, Any]) -> bool:
        """Make a request for the base model run without any adapter, where the engine needs
        to be told (in place); True when it changed anything."""
        return False

    @staticmethod
    def python() -> str:
        # Engines installed as Python packages run under the same interpreter as inferd.
        return sys.executable
