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
    """Parse one entry; a broken file is reported in one line with the file and the field."""
    try:
        return ModelEntry.model_validate(yaml.safe_load(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"catalog entry {name}{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"catalog entry {name}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"catalog entry {name}: {problems}") from None


class Catalog:
    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {e.id: e for e in entries}

    @classmethod
    def load(cls, folder: Path | None = None, *, extra: Path | None = None) -> Catalog:
        """Entries shipped in the package (or every `*.yaml` of `folder`), then those of `extra`
        (`INFERD_CATALOG_PATH`: a site's own models), which replace shipped ones of the same id."""
        entries: list[ModelEntry] = []
        if folder is not None:
            entries += cls._folder(folder)
        else:
            root = resources.files("inferd.catalog").joinpath("models")
            for item in sorted(root.iterdir(), key=lambda t: t.name):
                if item.name.endswith(".yaml"):
                    entries.append(_load_entry(item.name, item.read_text()))
        if extra is not None:
            if not extra.is_dir():
                raise ConfigError(f"catalog folder {extra} does not exist")
            entries += cls._folder(extra)
        return cls(entries)

    @staticmethod
    def _folder(folder: Path) -> list[ModelEntry]:
        return [_load_entry(str(p), p.read_text()) for p in sorted(folder.glob("*.yaml"))]

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
