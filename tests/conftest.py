"""Shared test paths."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Real captures from real machines: hardware/ (copied from the project's shared fixtures, so a
# fresh clone has them) and vllm-0.32.0/ (engine responses).
FIXTURES = Path(__file__).parent / "fixtures"
