"""`python -m inferd.engines.launch PARENT_PID [NICE] -- CMD...`: exec an engine that dies with
inferd.

The supervisor starts every engine through this tiny shim. It asks Linux to send SIGKILL to the
engine if inferd's process dies for any reason (even SIGKILL, where no clean-up code runs), then
replaces itself with the engine (`exec`), so no extra process stays around. The engine's own
children are in its process group, which the supervisor kills as a whole on a normal stop.
NICE, when given, lowers the engine's CPU priority by that much and runs it in Linux's idle
scheduling class (SCHED_IDLE: it runs only on a core nothing else wants), for an engine that
starts behind another one already serving (`server.supervisor`). Nice alone was not enough:
vLLM's compile at nice 10 took a single llama.cpp user from 137 to 17 tok/s on 2 cores, its
threads waiting at each other's barrier whenever one core went to vLLM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, *rest = sys.argv[1:] or [""]
    nice = rest.pop(0) if rest and rest[0] != "--" else "0"
    sep, *cmd = rest or [""]
    if sep != "--" or not cmd or not nice.isdigit():
        sys.exit("usage: python -m inferd.engines.launch PARENT_PID [NICE] -- CMD...")
    if int(nice):
        os.nice(int(nice))
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before prctl took effect: then nobody would reap us.
    if os.getppid() != int(parent):
        sys.exit(1)
    # The engine gets its standard streams and nothing else of inferd's: uvloop's spawn ignores
    # `close_fds`, so without this the engine would hold the front's listening socket (made
    # inheritable) and stray pipes, and its process tree would listen on the front's port.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.execvp(cmd[0], cmd)  # noqa: S606


if __name__ == "__main__":
    main()
