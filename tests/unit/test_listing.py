"""`inferd profiles` as a table: reasons are printed as written."""

from __future__ import annotations

import io

from rich.console import Console

from inferd.catalog import Catalog, hardware, profiles
from inferd.cli import listing
from tests.conftest import FIXTURES


def test_install_hints_keep_their_brackets() -> None:
    """Rich reads `[cpu]` as markup; the hint read "pip install 'inferd'" on the live H200."""
    entry = Catalog.load().get("llama-3.1-8b-instruct")
    hw = hardware.from_captures(FIXTURES / "hardware" / "h200")
    hint = "vLLM is not installed (`pip install 'inferd[gpu]'`)"
    found = profiles.candidates(entry, hw, unavailable={"vllm": hint})
    item = {
        "model": entry.id,
        "selected": None,
        "why": None,
        "profiles": [listing._row(c, None) for c in found],
    }
    out = io.StringIO()
    listing._print_model(Console(file=out, width=300), item)
    text = out.getvalue()
    assert f"vllm-hopper-fp8-tp1: {hint}" in text
    # The estimate is shown though the engine is missing: the hardware fits.
    row = next(line for line in text.splitlines() if line.strip().startswith("vllm-hopper-fp8"))
    assert "/ 126.4" in row
