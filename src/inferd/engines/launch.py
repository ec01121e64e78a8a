"""`python -m inferd.engines.launch PARENT_PID -- CMD...`: exec an engine that dies with inferd.

The supervisor starts every engine through this tiny shim. It asks Linux to send SIGKILL to the
engine if inferd's process dies for any reason (even SIGKILL, where no clean-up code runs), then
replaces itself with the engine (`exec`), so no extra process stays around. The engine's own
children are in its process group, which the supervisor kills as a whole on a normal stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        sys.exit("usage: python -m inferd.engines.launch PARENT_PID -- CMD...")
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
