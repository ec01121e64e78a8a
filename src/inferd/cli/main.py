"""The `inferd` command: parse arguments, run a subcommand, turn errors into one line.

Subcommands: `serve` (run the service), `models` (the catalog), `profiles` (a model's profiles and
whether each runs here), `version`. `serve`'s flags are generated from `config.Settings`, so every
setting is a flag with the same help text as its `INFERD_*` variable. User errors print one line
and exit 2; runtime failures print one line and exit 1; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from inferd import __version__
from inferd.config import SETTINGS_FIELDS, env_name, flag_name
from inferd.errors import InferdError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in SETTINGS_FIELDS:
        if f.name == "model":
            continue  # positional
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                help=help_text,
                choices=f.metadata.get("choices"),
                metavar=f.name.upper(),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inferd", description="An open, engine-neutral inference microservice.")
    parser.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API")
    serve.add_argument(
        "model", nargs="?", default=None, help=f"catalog id of the model [env {env_name('model')}]"
    )
    serve.add_argument(
        "--config", type=Path, default=None, help="YAML file of settings [env INFERD_CONFIG]"
    )
    _add_setting_flags(serve)

    models = sub.add_parser("models", help="list the models in the catalog")
    models.add_argument("--json", action="store_true", help="print JSON for programs")

    profiles = sub.add_parser("profiles", help="list a model's profiles and which run here")
    profiles.add_argument("model", nargs="?", default=None, help="catalog id (default: all)")
    profiles.add_argument("--json", action="store_true", help="print JSON for programs")

    sub.add_parser("version", help="print inferd's version")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    # Imports per command: `inferd version` should not pay for the server's imports.
    if args.command == "serve":
        from inferd.cli.serve import serve
        from inferd.config import load_settings

        flags: dict[str, Any] = {f.name: getattr(args, f.name) for f in SETTINGS_FIELDS}
        return serve(load_settings(flags, config_file=args.config))
    if args.command == "models":
        from inferd.cli.listing import list_models

        return list_models(as_json=args.json)
    if args.command == "profiles":
        from inferd.cli.listing import list_profiles

        return list_profiles(args.model, as_json=args.json)
    print(f"inferd {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except UsageError as exc:
        print(f"inferd: error: {exc.message}", file=sys.stderr)
        code = exc.exit_code
    except InferdError as exc:
        print(f"inferd: failed: {exc.message}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("inferd: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
