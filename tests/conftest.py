"""Shared test helpers: paths to the shared hardware captures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real captures from real machines (read-only, next to the repository).
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
LOCAL_FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    return LOCAL_FIXTURES
