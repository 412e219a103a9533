"""vLLM's processes, tied to the posttrain process that starts them.

vLLM starts processes of its own (its engine core, its workers). When the vLLM process we start dies
abruptly (killed, out of memory), they live on, spinning and holding memory (the GPU's, on a GPU). So
each vLLM process we start leads a process group of its own, and is ended with its whole group. A
server, which has no pipe from us to notice our end by, also gets SIGTERM when the posttrain process
that started it dies, however it dies (Linux's parent-death signal, set before vLLM loads).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

# Run first in the child: SIGTERM when the parent dies; a parent that died before that line was run is
# seen as the child's new parent.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                    "os.getppid() == {parent} or sys.exit(0)\n")


def start_group(command: list[str], **popen) -> subprocess.Popen:
    """`command` leading a process group of its own (ended with `end_group`)."""
    return subprocess.Popen(command, start_new_session=True, **popen)


def module_dying_with_us(python: str, module: str, args: list[str]) -> list[str]:
    """The command that runs `python -m module args`, ended by SIGTERM when this process dies (Linux). Linux
    sends it when the thread that started the process ends: start it from one that lives as long (the main)."""
    run = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    return [python, "-c", _DIE_WITH_PARENT.format(parent=os.getpid()) + run, *args]


def end_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to `proc`'s group (it and every process vLLM started under it), SIGKILL to what is left after
    `timeout` seconds; done once no process of the group runs."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        proc.poll()  # reaps the leader once it ended
        if not live_members(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not live_members(proc.pid):
                return
            time.sleep(0.1)


def live_members(group: int) -> list[int]:
    """The processes of process group `group` that still run: zombies hold nothing, and wait for whoever reaps
    orphans on this machine, which may be nobody."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, _, pgrp = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state != "Z":
            found.append(int(pid))
    return found
