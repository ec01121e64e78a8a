"""The adapter folder (`INFERD_LORA_PATH`), read: what each sub-folder holds and where it runs.

`AdapterFolder.scan` looks at every sub-folder; one whose files have not changed since the last
scan (same sizes and modification times) is not read again. A new or changed one is read and
checked (`cache.adapters`), placed on the first served model it fits (the one it names first,
then any whose architecture its tensors match), and kept in the cache
(`cache.adapter_store`, which converts it to GGUF for a llama.cpp engine, with several
engines behind the model for its llama.cpp one). Each comes back as a
`Found`: the stored adapter and its base model, or the reason it was refused. `server.adapters`
turns scans into the set being served. Scans run in a worker thread: reading, hashing and
converting take seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from inferd.cache import adapter_store
from inferd.cache import adapters as adapter_files
from inferd.cache.adapter_store import StoredAdapter
from inferd.cache.store import ModelStore
from inferd.engines import llamacpp_build
from inferd.errors import AdapterError, CacheError
from inferd.server.served import ServedModel

log = logging.getLogger("inferd.adapters")


@dataclass(frozen=True)
class Found:
    """An adapter folder as last seen: its files' sizes and times, and what came of it."""

    signature: tuple[int, ...]
    stored: StoredAdapter | None
    base: ServedModel | None
    reason: str = ""


class AdapterFolder:
    def __init__(
        self,
        folder: Path,
        models: list[ServedModel],
        store: ModelStore,
        max_rank: int,
        public_key: Path | None = None,
    ) -> None:
        self.folder = folder
        self.models = models
        self.store = store
        self.max_rank = max_rank
        self.public_key = public_key  # set: only adapters signed by this key are served
        self.seen: dict[str, Found] = {}

    def scan(self) -> dict[str, Found]:
        """Every sub-folder, read and checked unless unchanged since the last scan (`seen`,
        which the caller updates)."""
        try:
            folders = sorted(p for p in self.folder.iterdir() if p.is_dir())
        except OSError as exc:
            log.warning("cannot read the adapter folder %s: %s", self.folder, exc)
            return dict(self.seen)  # keep serving what is served
        result: dict[str, Found] = {}
        for folder in folders:
            if folder.name.startswith("."):
                continue
            signature = _signature(folder)
            seen = self.seen.get(folder.name)
            if seen is not None and seen.signature == signature:
                result[folder.name] = seen
                continue
            result[folder.name] = self._prepare(folder, signature)
        return result

    def _prepare(self, folder: Path, signature: tuple[int, ...]) -> Found:
        try:
            spec = adapter_files.read(folder)
            if any(m.id == spec.name for m in self.models):
                raise AdapterError(f"adapter {spec.name}: a served model has that id")
            base = self._base_for(spec)
            # A llama.cpp engine of the model (with several engines, any of them) takes it as
            # GGUF; the PEFT folder is kept either way, for vLLM.
            gguf = next(
                (
                    b.supervisor.engine
                    for b in base.backends
                    if b.supervisor.engine.adapter_format == "gguf"
                ),
                None,
            )
            if gguf is not None:
                log.info("adapter %s: made into a GGUF LoRA for llama.cpp (once)", spec.name)
            stored = adapter_store.keep(
                spec,
                base.id,
                self.store,
                gguf_base=gguf.model_dir if gguf is not None else None,
                converter=llamacpp_build.find_converter() if gguf is not None else None,
                public_key=self.public_key,
            )
        except CacheError as exc:
            return Found(signature, None, None, exc.message)
        return Found(signature, stored, base)

    def _base_for(self, spec: adapter_files.AdapterSpec) -> ServedModel:
        """The served model this adapter fits; the first one's reason if none does."""
        if not self.models:
            raise AdapterError(f"adapter {spec.name}: no chat model served here to run it on")
        named = [
            m
            for m in self.models
            if Path(spec.base_model).name.lower() in adapter_files.base_names(m.entry)
        ]
        first: AdapterError | None = None
        for m in named or self.models:
            try:
                adapter_files.check(spec, m.entry, self.max_rank)
                return m
            except AdapterError as exc:
                first = first or exc
        assert first is not None
        raise first


def _signature(folder: Path) -> tuple[int, ...]:
    """Sizes and modification times of an adapter's files: re-read only when they change."""
    parts: list[int] = []
    for name in adapter_files.FILES:
        try:
            info = (folder / name).stat()
            parts += [info.st_size, info.st_mtime_ns]
        except OSError:
            parts += [-1, -1]
    return tuple(parts)
