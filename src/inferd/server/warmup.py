"""A combined profile's later engines start on the cores its first engine's users leave idle.

vLLM's start behind llama.cpp compiles for a minute and more, and on a small CPU nothing short
of not running keeps that from slowing llama.cpp's users: measured on the 2-core EPYC, two
CPU-bound processes beside one llama.cpp stream made it 8-25x slower even in the idle scheduling
class or at nice 19 (llama.cpp's threads wait on each other at every step, so a thread that
loses its core for a moment stalls the whole step). So while a later engine starts, `Yield`
pauses it (`Supervisor.pause`: SIGSTOP to its process group) whenever the first engine is
running requests and nobody waits, and lets it go on otherwise: when the first engine is idle,
and when requests wait for a slot (a crowd the first engine cannot hold: the sooner the second
engine is ready the better, and they are slowed anyway). The start therefore takes longer while
a user is served; its deadline does not count the time paused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from inferd.server.admission import Admission


class Start(Protocol):
    """A later engine's start (`server.supervisor.Supervisor`)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Yield:
    """Watches a model's admission (`Admission.watchers`) and pauses or resumes the starts of
    its later engines (`starting`; a no-op for an engine that is ready)."""

    def __init__(self, admission: Admission, starting: Iterable[Start]) -> None:
        self.admission = admission
        self.starting = list(starting)

    def __call__(self) -> None:
        busy = self.admission.running > 0
        yields = busy and self.admission.waiting == 0
        for supervisor in self.starting:
            if yields:
                supervisor.pause()
            else:
                supervisor.resume()
