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

Once ready, a later engine takes requests when the turns give it some (`server.routing`), and
otherwise rests: `Supervisor.rest` stops it after a second with nothing to do and continues it
as soon as admission gives its lane a request (before the request is sent) or the front asks it
something of its own (`Supervisor.awake`). An idle vLLM still wakes a few times a second, and
on a small CPU each wake-up is taken from the first engine's user.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from inferd.server.admission import Admission


class Later(Protocol):
    """A later engine (`server.supervisor.Supervisor`): its start, and its rest once ready."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def rest(self, idle: bool) -> None: ...


class Yield:
    """Watches a model's admission (`Admission.watchers`) and pauses or resumes the starts of
    its later engines (`later`: by admission lane; a no-op for an engine that is ready), and
    tells each whether it has nothing to do (a no-op for an engine that is not ready)."""

    def __init__(self, admission: Admission, later: Mapping[int, Later]) -> None:
        self.admission = admission
        self.later = dict(later)

    def __call__(self) -> None:
        busy = self.admission.running > 0
        yields = busy and self.admission.waiting == 0
        for lane, supervisor in self.later.items():
            if yields:
                supervisor.pause()
            else:
                supervisor.resume()
            supervisor.rest(self.admission.lanes[lane].running == 0)
