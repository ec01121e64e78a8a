"""`inferd serve`: resolve model and profile, prepare the cache, start the front and the engine.

Order matters for the user: everything that can fail fast (unknown model, no fitting profile,
cache not writable, port in use) is checked before the slow work (download, conversion, engine
start), so a mistake costs a second, not minutes.
"""

from __future__ import annotations

import signal
import time

from rich.console import Console

from inferd import __version__
from inferd.cache import ModelStore, prepare
from inferd.catalog import Catalog, hardware, profiles
from inferd.cli.progress import RichReporter
from inferd.config import Settings
from inferd.engines import engine_for
from inferd.observability import logs
from inferd.server import runtime
from inferd.server.app import create_app
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor


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

    entry = Catalog.load().get(settings.model)
    hw = hardware.detect()
    profile = profiles.select(entry, hw, settings.profile)
    store = ModelStore(settings.cache_path)
    store.ensure_writable()
    sock = runtime.bind(settings.host, settings.port)

    console.print(f"[bold]inferd {__version__}[/bold] serving [bold]{entry.id}[/bold]")
    tags = " ".join(f"{k}={v}" for k, v in profile.tags.items())
    console.print(f"  profile  {profile.id} ({tags})")
    console.print(f"  hardware {hw.summary()}")
    prepared = prepare(
        entry,
        profile,
        store,
        index_url=settings.pypi_index_url,
        offline=settings.offline,
        reporter=RichReporter(console),
    )
    console.print(f"  model    {prepared.path} ({'reused' if prepared.reused else 'built'})")

    engine = engine_for(profile)(
        entry.id, prepared.path, profile, settings.engine_argv(), store.engine_dir(profile.engine)
    )
    supervisor = Supervisor(engine, ready_timeout_s=settings.engine_ready_timeout_s)
    served = ServedModel(entry, profile, supervisor, prepared.license_text, prepared.provenance)
    app = create_app([served], log_requests=settings.log_requests)

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{settings.port}"
    console.print(f"  api      {url}/v1  (health {url}/v1/health/ready, docs {url}/docs)")
    console.print(f"  engine   {engine.name} starting (live now, ready when the engine answers)")

    def on_ready(seconds: float) -> None:
        console.print(f"[green]ready[/green] in {seconds:.1f} s: {url}/v1 serves {entry.id}")

    return runtime.run(
        app, sock, [served], log_level=settings.log_level, on_ready=on_ready, started=started
    )
