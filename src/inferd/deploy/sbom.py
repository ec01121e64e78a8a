"""A CycloneDX SBOM of a Python environment (`inferd deploy sbom`), with `cyclonedx-bom`.

By default the environment inferd itself runs in: inside the image, that is the image's
environment, so `inferd deploy sbom` run there (or with `--python` pointing at the image's
interpreter) describes exactly what ships. The document is validated against the CycloneDX
schema by the tool as it is written; inferd is its root component (from pyproject.toml when it is
at hand).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from inferd.errors import InferdError, UsageError

SPEC_VERSION = "1.6"


def write(out: Path, python: str | None = None, pyproject: Path | None = None) -> dict[str, Any]:
    """Write `out/sbom.cdx.json`; returns a summary (path, components, spec version)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {out}: {exc.strerror or exc}") from None
    target = out / "sbom.cdx.json"
    interpreter = python or sys.executable
    if not Path(interpreter).is_file():
        raise UsageError(f"--python {interpreter}: no such interpreter")
    args = [sys.executable, "-m", "cyclonedx_py", "environment", interpreter,
            "--sv", SPEC_VERSION, "--of", "JSON", "-o", str(target), "--validate",
            "--output-reproducible"]  # fmt: skip
    if pyproject is not None and pyproject.is_file():
        args += ["--pyproject", str(pyproject)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InferdError(f"cyclonedx-py could not write the SBOM: {last}")
    bom = json.loads(target.read_text())
    return {
        "file": str(target),
        "spec_version": bom.get("specVersion"),
        "components": len(bom.get("components", [])),
        "python": interpreter,
    }
