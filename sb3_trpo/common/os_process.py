"""The operating system's side of a helper process: die with its parent, run on CPU time nobody else
wants, keep no inherited descriptor, and the CPU time ``/proc`` reports.

The C library's ``prctl`` is called through :mod:`sb3_trpo.common.native`.
Each function does nothing, or tells that it cannot tell, where the operating system lacks the call.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys

from sb3_trpo.common.native import kill_with_parent


def exit_with_parent(parent_pid: int, forked_by_main_thread: bool) -> None:
    """Have the kernel kill this process when its parent (the process that started it) dies, however it dies.

    :param parent_pid: the process id of the parent, read before the fork
    :param forked_by_main_thread: whether the parent's main thread started this process
    """
    # The kernel's "parent" is the forking thread: only the main thread lives as long as the
    # process. (Otherwise the child's own polling has to notice the parent's death.)
    if forked_by_main_thread:
        kill_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before prctl
        os._exit(0)


def close_inherited_descriptors(keep: set[int]) -> None:
    """Close every file descriptor above stderr inherited from the parent, except those in ``keep``.

    Pipes held by a forked child would keep other processes (SubprocVecEnv workers, another
    model's worker, the parent's own end of the child's connection) from seeing the other end close.
    """
    if faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__ if sys.__stderr__ is not None else sys.stderr)
    for stream in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            keep.add(stream.fileno())  # type: ignore[union-attr]
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        descriptors = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for descriptor in descriptors:
        if descriptor > 2 and descriptor not in keep:
            with contextlib.suppress(OSError):
                os.close(descriptor)


def lowest_priority() -> None:
    """Run this process only on CPU time no other process wants (``SCHED_IDLE``, else nice 19)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of process ``pid`` in clock ticks, None where ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def idle_cpu_ticks(cpus: set[int]) -> int | None:
    """Idle time (idle and iowait) of ``cpus`` since boot in clock ticks, from ``/proc/stat``; None where it cannot tell."""
    try:
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().splitlines()
        ticks = 0
        for line in lines[1:]:
            if not line.startswith(b"cpu"):
                break
            fields = line.split()
            if int(fields[0][3:]) in cpus:
                ticks += int(fields[4]) + int(fields[5])
        return ticks
    except (OSError, ValueError, IndexError):
        return None
