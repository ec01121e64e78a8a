"""GGUF -> GGUF re-quantization with llama.cpp's own `llama-quantize`.

Why: a profile may serve a quantization type other than the one a package ships. The default
model ships as Q4_1, and on x86 llama.cpp has no fast prompt kernel for Q4_1: its prompt runs at
half the speed of Q8_0's (benchmarks/RESULTS.md). Q8_0 made from the Q4_1 file keeps the Q4_1
values almost exactly (8-bit steps are finer than the 4-bit grid they hold), so quality is that of
the shipped file, which a perplexity check recorded in the profile notes confirms; going down
(Q4_1 -> Q4_0) would lose quality and is not offered by the catalog.

`llama-quantize` is built beside `llama-server` by the install step (`inferd.engines.
llamacpp_build`). It runs as a child process; its per-tensor lines (`[ 12/ 272] ...`) drive the
progress bar.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inferd.cache.reporting import SILENT, Reporter
from inferd.errors import CacheError

BINARY = "llama-quantize"
# inferd precision names -> llama-quantize type names.
TYPES = {"q8_0": "Q8_0", "q4_1": "Q4_1", "q4_k_m": "Q4_K_M", "bf16": "BF16", "fp16": "F16"}
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def find_quantizer() -> Path | None:
    """llama-quantize next to this Python (where `make install` puts it), else on PATH."""
    beside = Path(sys.executable).with_name(BINARY)
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    return Path(found) if found else None


def quantizer_build(binary: Path) -> dict[str, Any]:
    """What the binary was built from (the install step's stamp), for the provenance."""
    try:
        stamp: dict[str, Any] = json.loads(binary.with_name("llama-server.json").read_text())
    except (OSError, ValueError):
        return {"binary": str(binary)}
    return {"binary": str(binary), "source": stamp.get("source"), "sha256": stamp.get("sha256")}


def run_requantize(
    gguf: Path, out: Path, precision: str, reporter: Reporter = SILENT, *, name: str = ""
) -> dict[str, Any]:
    """Write `out` as `precision`; returns the provenance's conversion record.

    `name`: the file's name for messages (the cache hands over content-addressed blobs)."""
    name = name or gguf.name
    kind = TYPES.get(precision)
    if kind is None:
        raise CacheError(f"no GGUF quantization type for precision {precision!r}")
    binary = find_quantizer()
    if binary is None:
        raise CacheError(
            "llama-quantize is not installed: `make install` builds it with llama-server "
            "(or put a llama-quantize on PATH)"
        )
    started = time.monotonic()
    # --allow-requantize: the source is already quantized; that is the point here.
    cmd = [str(binary), "--allow-requantize", str(gguf), str(out), kind]
    task = reporter.task(f"re-quantize {name} -> {kind}", None)
    with task as advance, tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if _PROGRESS.match(line):
                    advance(1)
            code = proc.wait()
        except BaseException:  # interrupted: the child must not outlive us
            proc.kill()
            proc.wait()
            raise
        log.seek(0)
        output = log.read()
    if code != 0 or not out.is_file():
        tail = " | ".join(output.strip().splitlines()[-3:]) or f"exit code {code}"
        raise CacheError(f"re-quantizing {name} to {kind} failed: {tail}")
    return {
        "tool": "llama-quantize",
        "type": kind,
        **quantizer_build(binary),
        "seconds": round(time.monotonic() - started, 1),
    }
