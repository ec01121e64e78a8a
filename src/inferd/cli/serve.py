"""`inferd serve`: resolve model and profile, prepare the cache, start the front and the engine.

Order matters for the user: everything that can fail fast (unknown model, no fitting profile,
cache not writable, port in use) is checked before the slow work (download, conversion, engine
start), so a mistake costs a second, not minutes. `--dry-run` stops after resolving and prints
what would run (model, profile, memory estimate, cache paths, the exact engine command).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from inferd import __version__
from inferd.cache import PreparedModel, prepare, signing
from inferd.cache.prepare import intact, variant
from inferd.cache.reporting import LogReporter, Reporter
from inferd.catalog import measured
from inferd.catalog.schema import Profile
from inferd.cli.plan import Plan, fit_check, resolve_all
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.errors import CacheError, ConfigError, UsageError
from inferd.observability import logs
from inferd.server import boot
from inferd.server.adapters import Adapters
from inferd.server.engine_link import RuntimeFolder
from inferd.server.keys import KeyRing
from inferd.server.routing import Router, Speed, Table
from inferd.server.served import Backend, ServedModel
from inferd.server.supervisor import Supervisor

# Not imported here: the web stack (server.app, server.runtime: FastAPI, uvicorn, aiohttp) and
# the guardrails' numpy, about a second in all. `serve` starts the engines first and imports
# them while the engines load (`server.boot`); guardrails only when configured.
if TYPE_CHECKING:
    from inferd.guardrails.config import GuardrailsConfig
    from inferd.guardrails.jailbreak import Training


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(settings: Settings) -> int:
    started = time.monotonic()
    # Until uvicorn installs its own handlers, SIGTERM interrupts preparation like Ctrl-C does,
    # so a download or conversion child is cleaned up instead of orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    # soft_wrap: log collectors get whole lines, not lines cut at 80 columns.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    logs.configure(settings.log_level, settings.json_logs)

    plans = resolve_all(settings)
    guards = _guardrails(settings, plans)
    if settings.require_signed and settings.signing_public_key is None:
        raise ConfigError(
            "INFERD_REQUIRE_SIGNED needs the public key to check signatures with: "
            "INFERD_SIGNING_PUBLIC_KEY (--signing-public-key)"
        )
    keys = KeyRing(settings.api_keys_file)
    _refuse_open_bind(settings, keys)
    plans[0].store.ensure_writable()
    sock = boot.bind(settings.host, settings.port)

    names = ", ".join(p.entry.id for p in plans)
    console.print(f"[bold]inferd {__version__}[/bold] serving [bold]{names}[/bold]")
    console.print(f"  hardware {plans[0].hardware.summary()}")
    served: list[ServedModel] = []
    for plan in plans:
        served.append(_prepare(plan, settings, console, several=len(plans) > 1))
    training = _jailbreak_training(guards, served, plans[0], settings, console)
    fits = None if settings.force else fit_check(plans)
    adapters = Adapters.from_settings(settings, served, plans[0].store)
    if settings.lora_path is not None:
        console.print(f"  adapters {escape(adapters.summary())}")

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    scheme = "http" if settings.ssl_mode == "disabled" else "https"
    url = f"{scheme}://{host}:{settings.port}"
    console.print(f"  api      {url}/v1  (health {url}/v1/health/ready, docs {url}/docs)")
    auth = (
        f"on ({len(keys.describe())} key(s) in {settings.api_keys_file})"
        if keys.required
        else "off (no API keys configured)"
    )
    console.print(f"  keys     {auth}; TLS {settings.ssl_mode}")
    if guards is not None:
        console.print(f"  rails    {describe_rails(guards)} ({settings.guardrails_config})")
    engines = ", ".join("+".join(b.name for b in m.backends) for m in served)
    if settings.on_demand:
        console.print(f"  engine   {engines}, {_on_demand(settings, served)}")
    elif any(m.others for m in served):
        console.print(
            f"  engine   {engines} starting (live now, ready when each model's first engine "
            "answers; the others join when they are ready)"
        )
    else:
        console.print(f"  engine   {engines} starting (live now, ready when every engine answers)")

    def on_ready(seconds: float) -> None:
        console.print(f"[green]ready[/green] in {seconds:.1f} s: {url}/v1 serves {names}")

    async def front() -> int:
        # Imported here, while the engines started by `boot.run` load their models.
        from inferd.server import runtime
        from inferd.server.app import create_app

        app = create_app(served, settings, keys, guards, training, fits=fits, adapters=adapters)
        return await runtime.serve(app, sock, served, settings, on_ready=on_ready, started=started)

    # Each model's first engine starts at once (a combined profile's others once it is ready;
    # models on demand on their first request, or with the pool: both from the front).
    first = [] if settings.on_demand else [m.supervisor for m in served]
    return boot.run(first, front)


def _prepare(plan: Plan, settings: Settings, console: Console, *, several: bool) -> ServedModel:
    """Fetch and verify one model into the cache and build its supervised engine (each engine
    of a combined profile)."""
    entry, profile = plan.entry, plan.chosen.profile
    head = f"  {entry.id}\n  " if several else "  "
    tags = " ".join(f"{k}={v}" for k, v in profile.tags.items())
    if plan.combined is not None:
        tags = f"engines {' + '.join(p.profile.id for p in plan.parts)}"
    console.print(f"{head}profile  {plan.profile_id} ({tags}), context {plan.context}")
    console.print(f"  why      {escape(plan.why)}")
    if plan.note:  # a model given by path that the catalog ships: say the better way
        console.print(f"[yellow]  better   {escape(plan.note)}[/yellow]")
    if not plan.chosen.runnable:
        console.print(f"[yellow]  forced: {escape(plan.chosen.reason)}[/yellow]")
    first_part, *later = plan.engines_run
    prepared = _checked(plan, first_part.profile, settings, RichReporter(console))
    console.print(f"  model    {prepared.path} ({'reused' if prepared.reused else 'built'})")
    if settings.require_signed:
        console.print(f"  signed   {prepared.path} verified with {settings.signing_public_key}")
    first = _supervisor(plan, settings, prepared.path, first_part.profile, behind=False)
    if plan.combined is None:
        return ServedModel(entry, profile, first, prepared.license_text, prepared.provenance)
    others = []
    for part in later:
        # Checked, or fetched and built (a first run: vLLM's weights converted from the GGUF,
        # 25 s on two cores), once the first engine serves, just before this one starts
        # (`Backend.check`), so neither is in the way of readiness; a build is paused while
        # the first engine's users need the cores (`Supervisor.preparation`).
        folder = plan.store.model_dir(entry.id, variant(part.profile))
        when = "checked" if folder.is_dir() else "built"
        console.print(f"  model    {folder} ({when} once the first engine is ready)")
        check = functools.partial(_checked, plan, part.profile, settings, LogReporter(), folder)
        supervisor = _supervisor(plan, settings, folder, part.profile, behind=True)
        others.append(Backend(part.profile, supervisor, check=check))
    router, said = _router(plan, settings)
    console.print(f"  routing  {escape(said)}")
    return ServedModel(
        entry,
        profile,
        first,
        prepared.license_text,
        prepared.provenance,
        others=tuple(others),
        combined=plan.combined.id,
        router=router,
    )


def _checked(
    plan: Plan,
    profile: Profile,
    settings: Settings,
    reporter: Reporter,
    folder: Path | None = None,
    on_spawn: Callable[[int], None] | None = None,
) -> PreparedModel:
    """One engine's model, fetched, built or reused from the cache and its hashes checked; its
    signature too under INFERD_REQUIRE_SIGNED. `folder`: where the engine was told it is;
    `on_spawn`: told the pid of a conversion's child (`Backend.check`)."""
    prepared = prepare(
        plan.entry,
        profile,
        plan.store,
        index_url=settings.pypi_index_url,
        offline=settings.offline,
        reporter=reporter,
        on_spawn=on_spawn,
    )
    if folder is not None and prepared.path != folder:
        raise CacheError(f"{profile.id}'s model was prepared in {prepared.path}, not {folder}")
    if settings.require_signed:
        assert settings.signing_public_key is not None
        # Checked after the cache's own hash check: that trusts provenance.json, this does not.
        signing.verify(prepared.path, settings.signing_public_key)
    return prepared


def _supervisor(
    plan: Plan, settings: Settings, folder: Path, profile: Profile, *, behind: bool
) -> Supervisor:
    engine = plan.engine(settings, folder, profile)
    engine.cache_dir.mkdir(parents=True, exist_ok=True)
    # A combined profile's later engines start behind the first at a lower CPU priority.
    return Supervisor(
        engine,
        ready_timeout_s=settings.engine_ready_timeout_s,
        nice=BEHIND_NICE if behind else 0,
    )


# How much lower a combined profile's later engines run while they start (nice, 0-19): enough
# that the first engine's users keep its speed while vLLM compiles (benchmarks/RESULTS.md).
BEHIND_NICE = 10


def _router(plan: Plan, settings: Settings) -> tuple[Router, str]:
    """The router of a combined profile, from each engine's speed measured on this machine
    (`inferd tune`), else the catalog's reference figures; and where they came from."""
    found = measured.load(plan.store, measured.fingerprint(plan.hardware), plan.entry.id)
    speeds: list[Speed] = []
    said = []
    for part in plan.parts:
        profile = part.profile
        m = found.get(profile.id)
        if m is not None:
            speeds.append(m)
            said.append(f"{profile.id} measured here {m.date}")
        elif (ref := profile.reference_for(plan.hardware.cpu.features)) is not None:
            speeds.append(Table(ref.prompt_ms, ref.step_ms))
            said.append(f"{profile.id} by the catalog's figures ({ref.machine})")
        else:
            raise ConfigError(
                f"profile {plan.profile_id} routes by each engine's measured speed, and "
                f"{profile.id} has none: measure it with `inferd tune {plan.entry.id}`"
            )
    return Router(speeds, queue_timeout_s=settings.queue_timeout_s), "by speed: " + "; ".join(said)


def _on_demand(settings: Settings, served: list[ServedModel]) -> str:
    """How models load on demand, in a line."""
    pinned = [m.id for m in served if not m.on_demand]
    parts = [
        "on demand: each starts on its first request",
        f"at most {settings.max_loaded} loaded" if settings.max_loaded else "as many as fit",
        f"unloaded after {settings.idle_unload_s:g} s idle" if settings.idle_unload_s else "",
        f"kept loaded: {', '.join(pinned)} (starting now)" if pinned else "",
    ]
    return "; ".join(p for p in parts if p)


def _when_loaded(model: str, settings: Settings) -> str:
    if not settings.on_demand:
        return "at start"
    return "at start, kept loaded" if model in settings.pinned else "on its first request"


def _guardrails(settings: Settings, plans: list[Plan]) -> GuardrailsConfig | None:
    """The guardrails file, read and checked against the models served before anything slow
    starts (a mistake stops start-up); every model-backed rail's model named."""
    if not settings.guardrails_config:
        return None
    from inferd.guardrails import config as guard_config
    from inferd.guardrails.rails import Guardrails

    config = guard_config.load(settings.guardrails_config)
    return Guardrails(config, served={p.entry.id: p.entry.task for p in plans}).config


def _jailbreak_training(
    config: GuardrailsConfig | None,
    served: list[ServedModel],
    plan: Plan,
    settings: Settings,
    console: Console,
) -> Training | None:
    """Where the jailbreak classifier is; its training data fetched now if it must be trained
    (with a progress bar, before the engines start, so a fetch failure stops start-up)."""
    rail = config.input.jailbreak if config is not None else None
    if rail is None:
        return None
    from inferd.guardrails import jailbreak
    from inferd.guardrails.jailbreak import Training

    embedder = next(m for m in served if m.id == rail.model)  # named by `_guardrails`
    identity = json.dumps(embedder.provenance.get("source"), sort_keys=True)
    training = Training(jailbreak.probe_path(plan.store, embedder.id, identity))
    if jailbreak.Probe.load(training.probe_file) is not None:
        console.print(f"  rails    jailbreak classifier {training.probe_file}")
        return training
    training.data = jailbreak.fetch_data(
        plan.store,
        index_url=settings.pypi_index_url,
        offline=settings.offline,
        reporter=RichReporter(console),
    )
    console.print(
        f"  rails    jailbreak classifier: trained on {embedder.id} once its engine is ready "
        f"({jailbreak.DATA_SOURCE})"
    )
    return training


def describe_rails(config: GuardrailsConfig) -> str:
    parts = []
    for stage, rails in (("input", config.input), ("output", config.output)):
        for name, rail in dict(rails).items():
            if rail is not None:
                action = f" {rail.action}" if name == "pii" else ""
                where = "" if rail.inline else " (checks only)"
                parts.append(f"{stage} {name}{action}{where}")
    return ", ".join(parts) or "none on"


def _refuse_open_bind(settings: Settings, keys: KeyRing) -> None:
    """Listening beyond loopback without keys exposes the model to the network: say so. A
    service started with keys stays closed if they all go (`KeyRing.required`); only a restart
    without keys, allowed here by --allow-unauthenticated, serves openly."""
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and not keys.required and not settings.allow_unauthenticated:
        raise UsageError(
            f"refusing to listen on {settings.host} without API keys: create one with "
            "`inferd keys create NAME`, or pass --allow-unauthenticated "
            "(INFERD_ALLOW_UNAUTHENTICATED=1) if something in front already authenticates"
        )


def describe(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Everything `serve` would do, as data (for `--dry-run`)."""
    profile, est = plan.chosen.profile, plan.chosen.estimate
    folder = plan.model_dir
    present = folder.is_dir()
    ok = present and intact(folder, plan.entry.source(profile.source)) is not None
    command = plan.engine(settings).command(RuntimeFolder.planned(plan.entry.id))
    engines = [
        {
            "name": part.profile.engine,
            "profile": part.profile.id,
            "argv": plan.engine(settings, profile=part.profile)
            .command(RuntimeFolder.planned(plan.entry.id))
            .argv,
        }
        for part in plan.parts
    ]
    return {
        "model": plan.entry.id,
        **({"engines": engines} if engines else {}),
        "profile": {
            "id": plan.profile_id,
            "tags": profile.tags,
            "status": plan.chosen.status,
            "reason": plan.chosen.reason or None,
            "why": plan.why,
        },
        "context": plan.context,
        "hardware": plan.hardware.as_dict(),
        "estimate": None
        if est is None
        else {
            "weights_bytes": est.weights,
            "kv_cache_bytes": est.kv_cache,
            "overhead_bytes": est.overhead,
            "available_bytes": est.available,
        },
        "cache": {
            "root": str(plan.store.root),
            "model_dir": str(folder),
            "present": present,
            "intact": ok,
            "engine_cache": str(plan.store.engine_dir(profile.engine)),
        },
        "listen": {"host": settings.host, "port": settings.port},
        "loads": _when_loaded(plan.entry.id, settings),
        "engine": {
            "name": profile.engine,
            "argv": command.argv,
            "env": command.env,
            "note": "the engine listens on a Unix socket in a private folder (mode 0700) made "
            "at start, never on a port; XXXXXXXX stands for the folder's random part",
        },
    }


def dry_run(settings: Settings, *, as_json: bool) -> int:
    plans = resolve_all(settings)
    _guardrails(settings, plans)  # refused here too, with its line
    infos = [describe(plan, settings) for plan in plans]
    if as_json:
        # One model: its description, as before; several: a list of them.
        print(json.dumps(infos[0] if len(infos) == 1 else {"models": infos}, indent=2))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    for plan, info in zip(plans, infos, strict=True):
        if len(plans) > 1:
            console.print()
        _print_plan(console, plan, info, settings)
    console.print(f"listen   {settings.host}:{settings.port}")
    console.print(
        "         (engines listen on a Unix socket in a private folder made at start, never on "
        "a port; XXXXXXXX stands for the folder's random part)"
    )
    return 0


def _print_plan(console: Console, plan: Plan, info: dict[str, Any], settings: Settings) -> None:
    p = info["profile"]
    console.print(f"model    {info['model']}")
    console.print(
        f"profile  {p['id']} ({p['status']}) " + " ".join(f"{k}={v}" for k, v in p["tags"].items())
    )
    console.print(f"why      {escape(p['why'])}")
    console.print(f"context  {info['context']} tokens")
    console.print(f"loads    {info['loads']}")
    console.print(f"hardware {plan.hardware.summary()}")
    if info["estimate"]:
        e = info["estimate"]
        need = (e["weights_bytes"] + e["kv_cache_bytes"] + e["overhead_bytes"]) / 2**30
        console.print(
            f"memory   {need:.1f} GiB needed per device, "
            f"{e['available_bytes'] / 2**30:.1f} GiB usable"
        )
    c = info["cache"]
    # A model given by path needs no network: its folder links (or converts) the user's files.
    local = plan.entry.source(plan.chosen.profile.source).kind == "local"
    if c["intact"]:
        state = "present and intact"
    elif c["present"]:
        state = "present but altered: serve will rebuild it"
    elif local:
        state = "not in the cache yet: serve will link (or convert) the files given"
    elif settings.offline:
        state = "missing, and offline: bring it in with `inferd cache import FILE`"
    else:
        state = "not in the cache yet: serve will fetch it"
    console.print(f"cache    {c['model_dir']} ({state})")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in info["engine"]["env"].items())
    console.print(f"engine   {escape(env)} {escape(shlex.join(info['engine']['argv']))}")
    for later in info.get("engines", [])[1:]:  # a combined profile's others, started behind
        console.print(
            f"then     {escape(shlex.join(later['argv']))} (once the first is ready, at nice "
            f"{BEHIND_NICE})"
        )
