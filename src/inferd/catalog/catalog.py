"""The model catalog: one YAML file per model in `inferd/catalog/models/`, loaded and validated.

`Catalog.load()` reads every entry once; `get(id)` answers with the entry or an `UnknownModelError`
that lists what is available, so a typo never leaves the user guessing.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from inferd.catalog.schema import ModelEntry
from inferd.errors import ConfigError, UnknownModelError


def _load_entry(name: str, text: str) -> ModelEntry:
    try:
        return ModelEntry.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        # A broken catalog file is a packaging bug; say which file and why.
        raise ConfigError(f"catalog entry {name} is invalid: {exc}") from None


class Catalog:
    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {e.id: e for e in entries}

    @classmethod
    def load(cls, folder: Path | None = None) -> Catalog:
        """Entries shipped in the package, or every `*.yaml` of `folder` (tests, extra catalogs)."""
        entries: list[ModelEntry] = []
        if folder is not None:
            for path in sorted(folder.glob("*.yaml")):
                entries.append(_load_entry(path.name, path.read_text()))
        else:
            root = resources.files("inferd.catalog").joinpath("models")
            for item in sorted(root.iterdir(), key=lambda t: t.name):
                if item.name.endswith(".yaml"):
                    entries.append(_load_entry(item.name, item.read_text()))
        return cls(entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownModelError(
                f"unknown model {model_id!r}; the catalog has: {known}"
            ) from None
