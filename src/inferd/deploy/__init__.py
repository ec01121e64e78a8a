"""Deployment artifacts: Kubernetes objects, KServe resources, images and SBOMs."""

from __future__ import annotations

from pathlib import Path


def checkout() -> Path | None:
    """The source checkout inferd runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None
