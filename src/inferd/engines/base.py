"""The common shape of an engine: how to start it from a profile, and how to talk to it.

An engine is a real inference server run as its own process (vLLM's OpenAI server, llama.cpp's
server, ...). inferd never imports an engine's Python package; it builds the engine's command line
from the profile, then speaks HTTP to it on loopback. One subclass per engine in this package;
`server.supervisor` starts and watches the process, `server.proxy` forwards requests to it.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.catalog.schema import Profile


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
        self.extra_args = extra_args

    @abstractmethod
    def command(self, host: str, port: int) -> EngineCommand:
        """The full command line and environment that start this engine on host:port."""

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

    @staticmethod
    def python() -> str:
        # Engines installed as Python packages run under the same interpreter as inferd.
        return sys.executable
