"""`inferd deploy k8s|kserve MODEL --output DIR`: write the service's Kubernetes objects;
`inferd deploy sbom --output DIR`: the Python environment's SBOM.

Everything is checked before anything is written: the model (and a named profile) must be in
the catalog, names must be valid Kubernetes names, quantities valid quantities. Each object goes
into its own YAML file, numbered in the order `kubectl apply -f DIR` should create them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from inferd.cache import prepare
from inferd.catalog import Catalog, hardware
from inferd.cli.plan import resolve
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.deploy import checkout, image, inference_pool, kserve, llm_inference_service, sbom
from inferd.deploy.k8s import DeploySpec, objects
from inferd.errors import UsageError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def spec_from(settings: Settings, args: Any) -> DeploySpec:
    """A checked `DeploySpec` from the command's arguments (UsageError naming the flag)."""
    catalog = Catalog.load(extra=settings.catalog_path)
    entry = catalog.get(args.model)  # UnknownModelError names the known ones
    profile = args.profile or "default"
    if profile != "default" and entry.profile(profile) is None and not entry.combination(profile):
        known = ", ".join([*(p.id for p in entry.profiles), *(c.id for c in entry.combined)])
        raise UsageError(f"--profile {profile}: {entry.id} has no such profile (it has: {known})")
    gpus = args.gpus
    if gpus is None:
        chosen = entry.profile(profile) if profile != "default" else None
        gpus = chosen.gpus if chosen is not None else 0
    name = args.name or entry.id.replace(".", "-")
    if not _NAME.match(name):
        raise UsageError(
            f"--name {name!r}: a Kubernetes name is lower-case letters, digits and '-', at most "
            "53 characters, starting and ending with a letter or digit"
        )
    for flag in ("cpu", "memory", "cache_size"):
        value = getattr(args, flag)
        if not _QUANTITY.match(value):
            raise UsageError(f"--{flag.replace('_', '-')} {value!r}: not a Kubernetes quantity")
    if not 1 <= args.min_replicas <= args.max_replicas:
        raise UsageError("--min-replicas must be at least 1 and at most --max-replicas")
    if gpus < 0:
        raise UsageError("--gpus must be 0 or more")
    if args.startup_minutes < 1:
        raise UsageError("--startup-minutes must be at least 1")
    if args.target == "kserve":
        for flag in ("api_keys_secret", "tls_secret"):
            if getattr(args, flag):
                # KServe fronts the pod with its own routing; inferd's keys and TLS inside it
                # are not wired to that yet: refused rather than silently dropped.
                raise UsageError(
                    f"--{flag.replace('_', '-')} is not supported for KServe yet (use KServe's "
                    "own authentication and TLS)"
                )
    if getattr(args, "gateway", "none") == "inference-pool" and args.tls_secret:
        # The gateway and its picker reach pods over plain HTTP (the release's pool speaks
        # `http`): TLS ends at the Gateway's listener instead.
        raise UsageError(
            "--tls-secret is not supported with --gateway inference-pool (terminate TLS at the "
            "Gateway's listener)"
        )
    gateway_name = getattr(args, "gateway_name", None)
    if gateway_name is not None and not _NAME.match(gateway_name):
        raise UsageError(f"--gateway-name {gateway_name!r}: not a Kubernetes name")
    if gateway_name and args.target == "kserve" and not args.llm_inference_service:
        raise UsageError("--gateway-name needs --llm-inference-service (or `deploy k8s --gateway`)")
    for flag in ("api_keys_secret", "tls_secret", "namespace"):
        value = getattr(args, flag)
        if value is not None and not _NAME.match(value):
            raise UsageError(f"--{flag.replace('_', '-')} {value!r}: not a Kubernetes name")
    return DeploySpec(
        name=name,
        model=entry.id,
        image=args.image,
        profile=profile,
        namespace=args.namespace,
        gpus=gpus,
        cpu=args.cpu,
        memory=args.memory,
        cache=args.cache,
        cache_size=args.cache_size,
        cache_access=args.cache_access,
        storage_class=args.storage_class,
        host_path=args.host_path,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        drain_timeout_s=int(settings.drain_timeout_s),
        api_keys_secret=args.api_keys_secret,
        tls_secret=args.tls_secret,
        startup_minutes=args.startup_minutes,
    )


class _Dumper(yaml.SafeDumper):
    """Safe YAML, with text of several lines (a ConfigMap's file) as a readable `|` block."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, "|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def write(docs: list[dict[str, Any]], out: Path) -> list[Path]:
    """One file per object; files an earlier run wrote there are replaced, never mixed in."""
    earlier = sorted(out.glob("[0-9][0-9]-*.yaml")) if out.is_dir() else []
    others = [p for p in out.iterdir() if p not in earlier] if out.is_dir() else []
    if others:
        raise UsageError(f"--output {out} holds other files ({others[0].name}); use a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in earlier:
            stale.unlink()
    except OSError as exc:
        raise UsageError(f"--output {out}: {exc.strerror or exc}") from None
    paths = []
    for i, doc in enumerate(docs, 1):
        path = out / f"{i:02d}-{doc['kind'].lower()}.yaml"
        path.write_text(yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
        paths.append(path)
    return paths


def _sbom(args: Any) -> int:
    # The project's own pyproject.toml, when running from a checkout: the root component then
    # carries inferd's licence and description.
    root = checkout()
    summary = sbom.write(args.output, args.python, root / "pyproject.toml" if root else None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['file']}: CycloneDX {summary['spec_version']}, "
            f"{summary['components']} components of {summary['python']}"
        )
    return 0


def _containerfile(settings: Settings, args: Any) -> int:
    hw = None
    if settings.profile == "default":
        # Images are built for CPU profiles: choose as this machine would without its GPUs
        # (a GPU profile named with --profile is refused with the reason instead).
        hw = dataclasses.replace(hardware.detect(settings.hardware), gpus=())
    plan = resolve(settings, args.model, hw=hw)
    spec = image.ImageSpec(plan.entry, plan.chosen.profile, args.bake_model)
    model_dir = None
    if spec.bake:
        plan.store.ensure_writable()
        model_dir = prepare(
            plan.entry,
            spec.profile,
            plan.store,
            index_url=settings.pypi_index_url,
            offline=settings.offline,
            reporter=RichReporter(Console(stderr=True)),
        ).path
    written = image.write_context(spec, args.output, model_dir)
    summary = {
        "output": str(args.output),
        "model": spec.entry.id,
        "profile": spec.profile.id,
        "engine": spec.profile.engine,
        "baked": spec.bake,
        "files": [str(p) for p in written],
        "build": f"inferd image build {args.output}",
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.output}/Containerfile for {spec.entry.id} ({spec.profile.id})")
        print(f"build it with: {summary['build']}")
    return 0


def deploy(settings: Settings, args: Any) -> int:
    if args.target == "sbom":
        return _sbom(args)
    if args.target == "containerfile":
        return _containerfile(settings, args)
    spec = spec_from(settings, args)
    if args.target == "k8s":
        docs = objects(spec)
        if args.gateway == "inference-pool":
            docs += inference_pool.objects(spec, inference_pool.Gateway(args.gateway_name))
    elif args.llm_inference_service:
        docs = [
            llm_inference_service.llm_inference_service(spec, args.gateway_name),
            llm_inference_service.network_policy(spec),
        ]
    else:
        docs = [
            kserve.cluster_serving_runtime(spec),
            kserve.inference_service(spec),
            kserve.network_policy(spec),
        ]
    if args.target == "kserve" and spec.cache == "pvc":
        claim = next(d for d in objects(spec) if d["kind"] == "PersistentVolumeClaim")
        docs.insert(0 if args.llm_inference_service else 1, claim)
    paths = write(docs, args.output)
    rows = [
        {"file": str(p), "kind": d["kind"], "name": d["metadata"]["name"]}
        for p, d in zip(paths, docs, strict=True)
    ]
    if args.json:
        print(json.dumps({"output": str(args.output), "objects": rows}, indent=2))
        return 0
    table = Table(title=f"{spec.model}: {args.target} objects in {args.output}")
    for column in ("file", "kind", "name"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["file"], row["kind"], row["name"])
    Console(highlight=False).print(table)
    return 0
