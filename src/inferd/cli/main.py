"""The `inferd` command: parse arguments, run a subcommand, turn errors into one line.

    inferd serve [MODEL] [--dry-run [--json]]      run the service (or show what would run)
    inferd models [--json]                         the catalog
    inferd profiles [MODEL] [--hardware PATH]      each profile: runnable, smaller context, why not
    inferd tune MODEL [--profile ID ...]           measure its profiles here; selection uses them
    inferd cache pull|list|verify|sign|rm|export|import the model cache
    inferd keys create|list|revoke                 API keys
    inferd bench --url URL ... / bench report RUN.json ... --plot FILE.png
    inferd deploy k8s|kserve MODEL --output DIR   Kubernetes / KServe files for a service
    inferd deploy containerfile|sbom ...           an image build context; an SBOM
    inferd image build DIR                         build the image (buildah, no daemon)
    inferd version

Settings flags are generated from `config.Settings`, so each has the same help text as its
`INFERD_*` variable. User errors print one line and exit 2; runtime failures (a download that
fails, a file whose hash differs) print one line and exit 1; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from inferd import __version__
from inferd.config import SETTINGS_FIELDS, Settings, env_name, flag_name, load_settings
from inferd.errors import InferdError, UsageError

ALL = {f.name for f in SETTINGS_FIELDS}
SELECTION = {"hardware", "optimize", "max_model_len", "profile", "force", "catalog_path"}
CACHE = {"cache_path", "offline", "pypi_index_url", "catalog_path"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_settings(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    wanted = set(names)
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of settings [env INFERD_CONFIG]"
    )
    for f in SETTINGS_FIELDS:
        if f.name not in wanted or f.name == "model":
            continue
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


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for programs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inferd", description="An open, engine-neutral inference microservice.")
    parser.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API")
    serve.add_argument(
        "model",
        nargs="*",
        default=None,
        help="catalog id of the model, or a path (GGUF file, Hugging Face folder) or "
        "hf://ORG/NAME@REV; several share one endpoint "
        f"[env {env_name('model')}, comma-separated]",
    )
    serve.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run (model, profile, cache, engine command) and stop",
    )
    _json_flag(serve)
    _add_settings(serve, ALL)

    models = sub.add_parser("models", help="list the models in the catalog")
    _json_flag(models)
    _add_settings(models, {"catalog_path"})

    prof = sub.add_parser("profiles", help="list a model's profiles and which run here")
    prof.add_argument(
        "model", nargs="?", default=None, help="catalog id or path (default: every model)"
    )
    _json_flag(prof)
    # A model given by path: its generated entry is kept in the cache.
    _add_settings(prof, SELECTION - {"profile", "force"} | {"cache_path", "served_model_name"})

    tune = sub.add_parser("tune", help="measure a model's profiles on this machine")
    tune.add_argument("model", help="catalog id or path")
    tune.add_argument(
        "--profile",
        dest="tune_profiles",
        action="append",
        default=[],
        metavar="ID",
        help="measure this profile (repeatable; default: every profile runnable here)",
    )
    _json_flag(tune)
    _add_settings(tune, CACHE | {"engine_ready_timeout_s", "served_model_name"})

    cache = sub.add_parser("cache", help="manage the model cache").add_subparsers(
        dest="cache_command", required=True, parser_class=_Parser
    )
    pull = cache.add_parser("pull", help="fetch and prepare a model (for its selected profile)")
    pull.add_argument("model", help="catalog id or path")
    _json_flag(pull)
    _add_settings(pull, CACHE | SELECTION | {"log_level", "served_model_name"})
    listing = cache.add_parser("list", help="the models and LoRA adapters in the cache")
    _json_flag(listing)
    _add_settings(listing, {"cache_path"})
    verify = cache.add_parser("verify", help="re-hash cached files; exit 1 naming any that differ")
    verify.add_argument("model", nargs="?", default=None)
    verify.add_argument(
        "--signature",
        action="store_true",
        help="also check the model's signature with --signing-public-key",
    )
    verify.add_argument(
        "--signature-file", type=Path, default=None, help="the signature (default: beside it)"
    )
    _json_flag(verify)
    _add_settings(verify, CACHE | SELECTION | {"signing_public_key"})
    sign = cache.add_parser("sign", help="sign a cached model or adapter (OpenSSF signing, EC key)")
    sign.add_argument("model")
    sign.add_argument("--key", type=Path, required=True, help="private key (PEM)")
    sign.add_argument("--signature", type=Path, default=None, help="where (default: beside it)")
    _add_settings(sign, CACHE | SELECTION)
    rm = cache.add_parser("rm", help="remove a model (and source files nothing else uses)")
    rm.add_argument("model")
    _add_settings(rm, {"cache_path", "catalog_path"})
    exp = cache.add_parser("export", help="write a model or adapter and its manifest into one file")
    exp.add_argument("model")
    exp.add_argument("file", type=Path)
    _add_settings(exp, {"cache_path", "catalog_path"})
    imp = cache.add_parser("import", help="bring an exported model or adapter into this cache")
    imp.add_argument("file", type=Path)
    # An adapter's export is also placed in the adapter folder, when one is given.
    _add_settings(imp, {"cache_path", "catalog_path", "signing_public_key", "lora_path"})

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser
    )
    create = keys.add_parser("create", help="make a key; it is printed once, only its hash kept")
    create.add_argument("name")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute at most")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute at most")
    _add_settings(create, {"api_keys_file"})
    keys_list = keys.add_parser("list", help="the keys (names and limits, never the keys)")
    _json_flag(keys_list)
    _add_settings(keys_list, {"api_keys_file"})
    revoke = keys.add_parser("revoke", help="revoke a key (a running service notices at once)")
    revoke.add_argument("name")
    _add_settings(revoke, {"api_keys_file"})

    bench = sub.add_parser("bench", help="benchmark a served model (vLLM's serving benchmark)")
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    bench.add_argument("--model", default="smollm2-135m-instruct", help="model id to request")
    bench.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or hub id (default: the model's cached folder)",
    )
    bench.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated")
    bench.add_argument(
        "--request-rate",
        default=None,
        help="request-rate levels (req/s, comma-separated) instead of concurrency",
    )
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=128)
    bench.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="requests per level (default: 4 x concurrency, at least 8)",
    )
    bench.add_argument("--dataset", choices=("random", "sharegpt", "custom"), default="random")
    bench.add_argument("--dataset-path", default=None, help="file for sharegpt/custom datasets")
    bench.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    bench.add_argument("--slo", default="", help="latency limits for goodput, e.g. ttft=500,itl=50")
    bench.add_argument("--label", default="", help="name of this run in reports")
    bench.add_argument("--out", type=Path, default=None, help="results path (.json and .csv)")
    _json_flag(bench)
    _add_settings(bench, {"cache_path"})
    bench_report = sub.add_parser("bench-report", help=argparse.SUPPRESS)
    bench_report.add_argument("runs", nargs="+", type=Path, help="RUN.json files")
    bench_report.add_argument("--plot", type=Path, default=None, help="write a PNG figure here")
    _json_flag(bench_report)

    deploy = sub.add_parser("deploy", help="write deployment files (Kubernetes, KServe)")
    targets = deploy.add_subparsers(dest="target", required=True, parser_class=_Parser)
    for target, what in (
        ("k8s", "Kubernetes manifests: Deployment, Service, PVC, HPA, PDB, ServiceMonitor"),
        ("kserve", "a KServe ClusterServingRuntime and an InferenceService"),
    ):
        t = targets.add_parser(target, help=what)
        t.add_argument("model", help="catalog model id")
        t.add_argument("--output", type=Path, required=True, help="folder to write into")
        t.add_argument("--image", default=f"inferd:{__version__}", help="container image")
        t.add_argument("--name", default=None, help="object name (default: the model id)")
        t.add_argument("--namespace", default="inferd")
        t.add_argument("--profile", default=None, help="profile id (default: chosen per node)")
        t.add_argument("--gpus", type=int, default=None, help="GPUs per pod (default: profile's)")
        t.add_argument("--cpu", default="2", help="CPU request and limit per pod")
        t.add_argument("--memory", default="8Gi", help="memory request and limit per pod")
        t.add_argument("--cache", choices=("pvc", "hostpath"), default="pvc")
        t.add_argument("--cache-size", default="20Gi", help="the cache PVC's size")
        t.add_argument(
            "--cache-access",
            choices=("ReadWriteOnce", "ReadWriteMany"),
            default="ReadWriteOnce",
            help="PVC access mode (ReadWriteMany, where the storage offers it, lets pods on "
            "several nodes share one download)",
        )
        t.add_argument("--storage-class", default=None)
        t.add_argument("--host-path", default="/var/lib/inferd/cache")
        t.add_argument("--min-replicas", type=int, default=1)
        t.add_argument("--max-replicas", type=int, default=4)
        t.add_argument(
            "--startup-minutes", type=int, default=30, help="start-up budget (download included)"
        )
        t.add_argument("--api-keys-secret", default=None, help="Secret holding keys.json")
        t.add_argument("--tls-secret", default=None, help="kubernetes.io/tls Secret for HTTPS")
        if target == "k8s":
            t.add_argument(
                "--gateway",
                choices=("none", "inference-pool"),
                default="none",
                help="inference-pool: an InferencePool, its endpoint picker and an HTTPRoute "
                "(Kubernetes' inference gateway routes by each pod's queue and KV-cache use)",
            )
            t.add_argument(
                "--gateway-name",
                default="inference-gateway",
                help="the Gateway (in --namespace) the HTTPRoute attaches to",
            )
        else:
            t.add_argument(
                "--llm-inference-service",
                action="store_true",
                help="an LLMInferenceService (KServe's way to the inference gateway) instead of "
                "the ClusterServingRuntime and InferenceService",
            )
            t.add_argument(
                "--gateway-name",
                default=None,
                help="with --llm-inference-service: a Gateway in --namespace (default: KServe's)",
            )
        _json_flag(t)
        _add_settings(t, {"catalog_path", "drain_timeout_s"})
    cf = targets.add_parser("containerfile", help="an image build context for a model")
    cf.add_argument("model", help="catalog model id")
    cf.add_argument("--output", type=Path, required=True, help="folder to write into")
    cf.add_argument(
        "--bake-model", action="store_true", help="put the model in the image (else a volume)"
    )
    _json_flag(cf)
    _add_settings(cf, CACHE | SELECTION)
    sbom = targets.add_parser("sbom", help="a CycloneDX SBOM of the Python environment")
    sbom.add_argument("--output", type=Path, required=True, help="folder to write into")
    sbom.add_argument(
        "--python", default=None, help="interpreter of the environment (default: inferd's own)"
    )
    _json_flag(sbom)

    image = sub.add_parser("image", help="build container images (buildah)").add_subparsers(
        dest="image_command", required=True, parser_class=_Parser
    )
    ib = image.add_parser("build", help="build the image of a context from `deploy containerfile`")
    ib.add_argument("context", type=Path)
    ib.add_argument("--tag", default=f"localhost/inferd:{__version__}")
    ib.add_argument(
        "--base",
        default=None,
        help="base image (default: Debian made here with debootstrap, for machines without a "
        "registry)",
    )
    ib.add_argument(
        "--ca-bundle",
        type=Path,
        default=None,
        help="CA bundle for pip inside the build, as a build secret (default: this machine's "
        "PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE, if set)",
    )

    sub.add_parser("version", help="print inferd's version")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in ALL}
    if args.command == "serve":
        flags["model"] = ",".join(args.model) if args.model else None
    return load_settings(flags, config_file=getattr(args, "config", None))


def _cache(args: argparse.Namespace, s: Settings) -> int:
    # Imports per command: `inferd version` should not pay for the server's imports.
    from inferd.cli import cache_cmd

    commands: dict[str, Callable[[], int]] = {
        "pull": lambda: cache_cmd.pull(s, args.model, as_json=args.json),
        "list": lambda: cache_cmd.list_cached(s, as_json=args.json),
        "verify": lambda: cache_cmd.verify(
            s,
            args.model,
            as_json=args.json,
            signature=args.signature or args.signature_file is not None,
            signature_file=args.signature_file,
        ),
        "sign": lambda: cache_cmd.sign(s, args.model, args.key, args.signature),
        "rm": lambda: cache_cmd.remove(s, args.model),
        "export": lambda: cache_cmd.export_cmd(s, args.model, args.file),
        "import": lambda: cache_cmd.import_cmd(s, args.file),
    }
    return commands[args.cache_command]()


def _levels(text: str, kind: type[float] | type[int], flag: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected positive numbers")
    return values


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from inferd.bench.runner import BenchSpec, parse_slo
    from inferd.cli.bench_cmd import default_tokenizer, run

    if args.dataset != "random" and not args.dataset_path:
        raise UsageError(f"--dataset {args.dataset} needs --dataset-path")
    for name in ("input_len", "output_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    # Cheap checks first: a typo must not wait for (or be hidden by) the tokenizer lookup.
    concurrency = _levels(args.concurrency, int, "--concurrency")
    rates = _levels(args.request_rate, float, "--request-rate") if args.request_rate else []
    slo = parse_slo(args.slo)
    spec = BenchSpec(
        url=args.url,
        model=args.model,
        tokenizer=args.tokenizer or default_tokenizer(settings, args.model),
        input_len=args.input_len,
        output_len=args.output_len,
        concurrency=concurrency,
        request_rates=rates,
        prompts_per_level=args.prompts,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        chat=args.chat,
        slo=slo,
        label=args.label,
    )
    out = args.out or Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    return run(spec, out, as_json=args.json)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "version":
        print(f"inferd {__version__}")
        return 0
    settings = _settings(args)
    if args.command == "models":
        from inferd.cli.listing import list_models

        return list_models(settings, as_json=args.json)
    if args.command == "serve":
        from inferd.cli.serve import dry_run, serve

        if args.dry_run:
            return dry_run(settings, as_json=args.json)
        if args.json:
            raise UsageError(
                "--json goes with --dry-run (a running service logs, it does not print a result)"
            )
        return serve(settings)
    if args.command == "bench":
        return _bench(args, settings)
    if args.command == "bench-report":
        from inferd.cli.bench_cmd import show_report

        return show_report(args.runs, args.plot, as_json=args.json)
    if args.command == "keys":
        from inferd.cli import keys_cmd

        if args.keys_command == "create":
            for limit in ("rpm", "tpm"):
                if getattr(args, limit) is not None and getattr(args, limit) < 1:
                    raise UsageError(f"--{limit} must be at least 1")
            return keys_cmd.create(settings, args.name, args.rpm, args.tpm)
        if args.keys_command == "list":
            return keys_cmd.list_keys(settings, as_json=args.json)
        return keys_cmd.revoke(settings, args.name)
    if args.command == "image":
        from inferd.deploy import image as image_build

        tag = image_build.build(args.context, args.tag, args.base, args.ca_bundle)
        print(f"built {tag}")
        return 0
    if args.command == "deploy":
        from inferd.cli.deploy_cmd import deploy

        return deploy(settings, args)
    if args.command == "tune":
        from inferd.cli import tune_cmd

        return tune_cmd.run(settings, args.model, args.tune_profiles, as_json=args.json)
    if args.command == "profiles":
        from inferd.cli.listing import list_profiles

        return list_profiles(settings, args.model, as_json=args.json)
    return _cache(args, settings)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:2] == ["bench", "report"]:  # `inferd bench report ...` reads as its own command
        words = ["bench-report", *words[2:]]
    args = build_parser().parse_args(words)
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
