"""The background critic worker: a forked process that runs :func:`~sb3_trpo.common.critic.fit_critic`
on weights and Adam state shared with the training process, and its protocol.

As SB3's ``SubprocVecEnv``: :func:`_worker` is the process's loop, :class:`CriticWorker` the
training process's handle on it. They talk over a socket pair: the training process sends a
pickled :class:`~sb3_trpo.common.critic.CriticJob`, the worker replies with a pickled
``(status, value)``: ``("done", mean loss or None)``, ``("stopped", the stacked minibatch losses
or None)`` or ``("error", traceback)``; each message is its length (8 bytes) then its bytes. A
request to stop between two minibatches is one byte of anonymous shared memory, which the
worker reads before each minibatch.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import threading
import traceback
import weakref
from typing import Any

import torch as th
from stable_baselines3.common.policies import BasePolicy
from torch import nn

from sb3_trpo.common.critic import ADAM_OPTIMIZERS, CriticJob, FitStopped, fit_critic
from sb3_trpo.common.os_process import close_inherited_descriptors, cpu_ticks, exit_with_parent, lowest_priority

_HEADER = struct.Struct("!Q")
_POLL_S = 1.0  # how often a waiting process looks at the other one
_STALL_POLLS = 30  # a worker without CPU time for this many polls is hung
_STOP_TIMEOUT_S = 5.0


class WorkerLost(Exception):
    """The background worker died, hung, failed or lost its connection; the fit it had is not done."""


def background_unavailable(device: th.device, optimizer_class: type) -> str | None:
    """Why the critic cannot be fitted in a background worker here, or None when it can."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork a process"
    if device.type != "cpu":
        return f"it runs on the CPU only, and the policy is on {device}"
    if optimizer_class not in ADAM_OPTIMIZERS:
        return f"it needs Adam or AdamW as the critic's optimizer, not {optimizer_class.__name__}"
    if multiprocessing.current_process().daemon:
        return "this is a daemonic process (a multiprocessing pool's worker), which cannot start one"
    return None


# ----------------------------------------------------------------------------- in the worker process
def _worker(
    connection: socket.socket,
    policy: BasePolicy,
    optimizer: th.optim.Optimizer,
    critic_parameters: list[nn.Parameter],
    stop_requested: mmap.mmap,
    parent_pid: int,
    forked_by_main_thread: bool,
) -> None:
    # Ctrl-C goes to the whole process group; the training process decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent_pid, forked_by_main_thread)
    close_inherited_descriptors({connection.fileno()})
    # A busy machine gives the worker no time: the training process then takes its fit over
    # at the end of the rollout instead of waiting, and the worker took no time from anyone.
    lowest_priority()
    # One thread: the worker's only use is a core nobody else wants.
    th.set_num_threads(1)
    while True:
        if not _ready(connection, write=False, timeout_s=_POLL_S):
            if os.getppid() != parent_pid:
                return
            continue
        try:
            job = _receive_blocking(connection)
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        try:
            loss = fit_critic(policy, optimizer, critic_parameters, job, stop=lambda: stop_requested[0] != 0)
            reply = ("done", loss)
        except FitStopped as stopped:
            reply = ("stopped", th.stack(stopped.losses) if stopped.losses else None)
        except Exception:  # reported to the training process, which fits in its own process instead
            reply = ("error", traceback.format_exc())
        payload = pickle.dumps(reply)
        try:
            connection.sendall(_HEADER.pack(len(payload)) + payload)
        except OSError:
            return


def _receive_blocking(connection: socket.socket) -> Any:
    def read(size: int) -> bytearray:
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        while received < size:
            count = connection.recv_into(view[received:])
            if count == 0:
                raise EOFError
            received += count
        return buffer

    (size,) = _HEADER.unpack(read(_HEADER.size))
    return pickle.loads(read(size))


def _ready(connection: socket.socket, write: bool, timeout_s: float) -> bool:
    """Whether ``connection`` can be written (or read, or is closed) within ``timeout_s`` seconds.

    ``poll``, not ``select``: the descriptor's number may be above ``select``'s 1024 (every
    tensor in shared memory keeps a descriptor open).
    """
    poller = select.poll()
    poller.register(connection, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


# ----------------------------------------------------------------------------- in the training process
def _initialize_adam_state(optimizer: th.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create Adam's state for ``params`` as its first step would, so that it can be shared before that step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not any(param is p for p in params) or optimizer.state[param]:
                continue
            state = optimizer.state[param]
            state["step"] = th.zeros((), dtype=th.float32, device=param.device)
            state["exp_avg"] = th.zeros_like(param, memory_format=th.preserve_format)
            state["exp_avg_sq"] = th.zeros_like(param, memory_format=th.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = th.zeros_like(param, memory_format=th.preserve_format)


def _stop(process: multiprocessing.process.BaseProcess, connection: socket.socket) -> None:
    """Close the worker's connection (it exits at end of file) and reap it, killing it if it does not exit."""
    connection.close()
    if process.pid is None:
        return
    process.join(_STOP_TIMEOUT_S)
    if process.exitcode is None:
        process.kill()
        process.join()


class CriticWorker:
    """A forked worker process that fits the critic on weights and Adam state shared with this process.

    The policy's parameters and the critic's Adam state move to shared memory, so the
    worker's updates are the training process's weights and optimizer state. The worker runs
    at the lowest priority (``SCHED_IDLE``), on CPU time no other process wants; a fit it has
    not finished when the training process needs the critic is stopped between two minibatches
    (:meth:`request_stop`) and continued there. The worker ignores Ctrl-C, exits when the
    training process dies (even by SIGKILL), and keeps no file descriptor but its connection.
    Every wait on it here ends: :class:`WorkerLost` is raised when the worker exits, fails, or
    gets no CPU time for ``_STALL_POLLS`` polls.

    :param policy: the policy whose critic is fitted
    :param optimizer: the critic's optimizer (Adam or AdamW)
    :param critic_parameters: the parameters the fit moves
    """

    def __init__(self, policy: BasePolicy, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter]):
        reason = background_unavailable(policy.device, type(optimizer))
        if reason is not None:
            raise ValueError(f"the critic cannot be fitted in a background process: {reason}")
        _initialize_adam_state(optimizer, critic_parameters)
        policy.share_memory()
        for param in critic_parameters:
            for value in optimizer.state[param].values():
                value.share_memory_()
        self._connection, child = socket.socketpair()
        # One byte of anonymous shared memory, read by the worker between two minibatches.
        self._stop_requested = mmap.mmap(-1, 1)
        self._process = multiprocessing.get_context("fork").Process(
            target=_worker,
            args=(
                child,
                policy,
                optimizer,
                critic_parameters,
                self._stop_requested,
                os.getpid(),
                threading.current_thread() is threading.main_thread(),
            ),
            daemon=True,
        )
        # Frozen objects are never visited by the worker's garbage collector, so their pages
        # stay shared instead of being copied one by one (a user's own freeze is left alone).
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            self._process.start()
        except OSError as error:  # fork refused (memory, process limit)
            self._connection.close()
            raise WorkerLost(f"it could not start ({error})") from error
        finally:
            if freeze:
                gc.unfreeze()
            child.close()
        self._connection.setblocking(False)
        # Not __del__: at exit, or in a reference cycle, the connection may be finalized first.
        self._finalizer = weakref.finalize(self, _stop, self._process, self._connection)

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """Whether the worker has not been stopped (it may still have died on its own)."""
        return self._finalizer.alive

    def fileno(self) -> int:
        """The descriptor of this process's end of the connection (-1 once stopped)."""
        return self._connection.fileno()

    def send(self, job: CriticJob) -> None:
        """Send a fit to the worker."""
        self._stop_requested[0] = 0
        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        try:
            while data:
                self._wait(write=True)
                try:
                    data = data[self._connection.send(data) :]
                except BlockingIOError:
                    continue
                except OSError as error:
                    raise self._lost(f"its connection broke ({error})", error) from error
        except BaseException:
            # A message cut in the middle (by a Ctrl-C as well) leaves the connection unusable.
            self.close()
            raise

    def replied(self) -> bool:
        """Whether the worker has replied (or exited): :meth:`receive` returns without waiting."""
        return _ready(self._connection, write=False, timeout_s=0)

    def request_stop(self) -> None:
        """Have the worker stop its fit before the next minibatch (:meth:`receive` then gives a :class:`FitStopped`)."""
        self._stop_requested[0] = 1

    def receive(self) -> float | FitStopped | None:
        """Wait for the worker's reply: the fit's mean loss (None when the weights became non-finite and were
        restored) or, when it was stopped, a :class:`~sb3_trpo.common.critic.FitStopped`.

        Interrupting the wait (Ctrl-C) leaves the fit running and the worker usable.
        """
        received = False
        try:
            header = self._read(_HEADER.size)
            received = True
            status, value = pickle.loads(self._read(_HEADER.unpack(header)[0]))
        except BaseException:
            if received:
                self.close()
            raise
        if status == "error":
            raise WorkerLost(f"the fit raised {value.strip().splitlines()[-1]}")
        if status == "stopped":
            return FitStopped([] if value is None else list(value.unbind()))
        return value

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        self._finalizer()

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        while received < size:
            self._wait(write=False)
            try:
                count = self._connection.recv_into(view[received:])
            except BlockingIOError:
                continue
            except OSError as error:
                raise self._lost(f"its connection broke ({error})", error) from error
            if count == 0:
                raise self._lost("it exited")
            received += count
        return bytes(buffer)

    def _wait(self, write: bool) -> None:
        """Return once the connection is ready; raise :class:`WorkerLost` if the worker died or hangs."""
        ticks, stalled = cpu_ticks(self._process.pid), 0  # type: ignore[arg-type]
        while not _ready(self._connection, write, _POLL_S):
            if self._process.exitcode is not None:
                raise self._lost("it exited")
            now = cpu_ticks(self._process.pid)  # type: ignore[arg-type]
            stalled = stalled + 1 if now is not None and now == ticks else 0
            ticks = now
            if stalled >= _STALL_POLLS:
                self._process.kill()
                raise self._lost(f"it got no CPU time for {stalled * _POLL_S:.0f} s and was killed")

    def _lost(self, what: str, error: OSError | None = None) -> WorkerLost:
        self._process.join(_STOP_TIMEOUT_S)  # a lost worker is exiting, or was killed: its exit status says why
        code = self._process.exitcode
        if error is not None and code is not None:
            what = "it exited"  # a connection reset by its death (before it read what was sent)
        if code is not None and code < 0:
            what += f" (killed by {signal.Signals(-code).name})"
        elif code:
            what += f" (exit code {code})"
        return WorkerLost(what)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a background critic worker cannot be pickled")
