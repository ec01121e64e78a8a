"""How long cache work reports its progress, without the cache knowing about terminals.

`cli` passes a rich-backed reporter (progress bars on a terminal); tests pass `SILENT`, and a
running server `LogReporter` (a log line per task and note). A task is a context manager that
yields an `advance(n)` callable; `total=None` means the size is unknown (a spinner rather than
a bar).
"""

from __future__ import annotations

import contextlib
import logging
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


class LogReporter:
    """Cache work done while the service runs (a combined profile's later engines' models):
    each task and note as a log line, no bars."""

    def __init__(self, name: str = "inferd.cache") -> None:
        self.log = logging.getLogger(name)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        self.log.info("%s", description)
        yield lambda n: None

    def note(self, message: str) -> None:
        self.log.warning("%s", message)
