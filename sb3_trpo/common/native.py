"""Every call of the package into a C library, through ``ctypes``: one place to review and to port.

Two calls, each optional (None or nothing where the library or the call is missing):
``prctl(PR_SET_PDEATHSIG)`` in the C library, for helper processes that must die with their
parent (:mod:`sb3_trpo.common.os_process`), and MKL's per-thread thread count in torch's own
library, for the exact sampler (:mod:`sb3_trpo.common.exact_sampler`).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch as th

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def kill_with_parent(signum: int) -> None:
    """Ask Linux to send ``signum`` to this process when the thread that forked it ends; nothing elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def mkl_thread_setter() -> Callable[[int], int] | None:
    """MKL's ``mkl_set_num_threads_local`` in torch's library, or None where torch does not compute with MKL.

    It sets the number of threads MKL uses in the calling thread only and returns the previous
    setting (0: the global one), so nothing else in the process computes on fewer threads.
    """
    if not th.backends.mkl.is_available():
        return None
    try:
        setter = ctypes.CDLL(str(Path(th.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    setter.argtypes = [ctypes.c_int]
    setter.restype = ctypes.c_int
    return setter
