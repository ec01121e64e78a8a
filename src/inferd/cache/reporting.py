"""How long cache work reports its progress, without the cache knowing about terminals.

`cli` passes a rich-backed reporter (progress bars on a terminal); tests and servers pass
`SILENT`. A task is a context manager that yields an `advance(n)` callable; `total=None` means
the size is unknown (a spinner rather than a bar).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[int], object]


class Reporter(Protocol):
    def task(
        self, description: str, total: int | None = None
    ) -> contextlib.AbstractContextManager[Advance]: ...

    def note(self, message: str) -> None: ...


class _Silent:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n: None

    def note(self, message: str) -> None:
        pass


SILENT: Reporter = _Silent()
