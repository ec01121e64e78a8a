"""What the front knows about each model it serves, and the lookup by a request's `model`.

`cli` builds one `ServedModel` per model (catalog entry, chosen profile, what the cache prepared,
the engine's supervisor) and hands the list to `create_app`; the front never looks anything up in
the catalog or cache itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import EngineNotReadyError, InvalidRequestError, ModelNotFoundError
from inferd.server.admission import Admission
from inferd.server.supervisor import State, Supervisor


@dataclass
class ServedModel:
    entry: ModelEntry
    profile: Profile
    supervisor: Supervisor
    license_text: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    # Set by `create_app`, which owns the metrics the admission gauges belong to.
    admission: Admission = field(init=False)

    @property
    def id(self) -> str:
        return self.entry.id

    def require_ready(self) -> None:
        if self.supervisor.state is not State.READY:
            raise EngineNotReadyError(
                f"model {self.id} is not ready yet (engine {self.supervisor.state.value}); "
                "retry shortly"
            )


class ModelTable:
    def __init__(self, models: list[ServedModel]) -> None:
        self._by_id = {m.id: m for m in models}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def lookup(self, model: object) -> ServedModel:
        """The served model a request's `model` field names, or the matching 400/404."""
        if model is None:
            raise InvalidRequestError("model is required", param="model")
        if not isinstance(model, str):
            raise InvalidRequestError("model must be a string", param="model")
        try:
            return self._by_id[model]
        except KeyError:
            served = ", ".join(sorted(self._by_id))
            raise ModelNotFoundError(
                f"The model `{model}` does not exist. This service serves: {served}.",
                param="model",
            ) from None
