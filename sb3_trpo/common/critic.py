"""The critic's regression on the returns, in this process or in a background worker process.

TRPO fits its critic after the trust-region step, and the next rollout does not need the
critic until its end (values are computed in one batched pass after the rollout). So the
fit can run in a second process while the next rollout is collected, on CPU time no other
process wants (the worker runs at the lowest priority). :class:`CriticFit` owns that choice
and the worker's whole lifecycle: the algorithm calls :meth:`CriticFit.run`,
:meth:`CriticFit.wait` and :meth:`CriticFit.close`. Both processes run :func:`fit_critic`
on the same weights and optimizer state, with the same minibatch order, so they compute the
same numbers, and a fit the worker has not finished when the critic is needed is stopped
between two minibatches and finished in this process. A worker that dies, hangs or fails
is replaced by the fit in this process, from the state the critic had before the lost fit.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import gc
import itertools
import mmap
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo.common.validation import NonFiniteError

BackgroundSetting = bool | Literal["auto"]
BACKGROUND_OPTIMIZERS = (th.optim.Adam, th.optim.AdamW)


def index_observations(observations: PyTorchObs, index: th.Tensor | slice) -> PyTorchObs:
    """Select rows of a tensor or of every tensor of a dict observation."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def prefer_fused_adam(optimizer: th.optim.Optimizer) -> None:
    """Run SB3's default Adam with PyTorch's fused kernel: the same update in one call instead of one per tensor.

    Parameter groups where the user set ``fused`` or ``foreach`` (through
    ``policy_kwargs["optimizer_kwargs"]``) are left as they are.
    """
    if type(optimizer) not in BACKGROUND_OPTIMIZERS:
        return
    for group in optimizer.param_groups:
        if group.get("fused") is None and not group.get("foreach") and not group.get("differentiable"):
            group["fused"] = True
            # State made by the unfused kernel (an sb3-contrib model, a loaded optimizer) keeps
            # its step counters on the CPU, where the fused CUDA kernel cannot read them.
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=param.device, dtype=th.float32)


@dataclass
class CriticFitJob:
    """One critic fit: the rollout's observations and returns, and the minibatch order of every epoch."""

    observations: np.ndarray | dict[str, np.ndarray]
    returns: np.ndarray
    permutations: np.ndarray  # (epochs, samples)
    batch_size: int
    learning_rate: float

    @classmethod
    def from_rollout(cls, buffer: RolloutBuffer, epochs: int, batch_size: int, learning_rate: float) -> CriticFitJob:
        """A fit on the buffer's returns, minibatches drawn as sb3-contrib's ``buffer.get(batch_size)``, epoch by epoch."""
        n_samples = buffer.buffer_size * buffer.n_envs
        permutations = np.array([np.random.permutation(n_samples) for _ in range(epochs)], dtype=np.int64)
        return cls(
            observations=buffer.observations,
            returns=buffer.returns.flatten(),
            permutations=permutations.reshape(-1, n_samples),
            batch_size=batch_size,
            learning_rate=learning_rate,
        )


def _as_tensors(observations: np.ndarray | dict[str, np.ndarray], device: th.device) -> PyTorchObs:
    if isinstance(observations, dict):
        return {key: th.as_tensor(value, device=device) for key, value in observations.items()}
    return th.as_tensor(observations, device=device)


class CriticSnapshot:
    """The critic's weights and its optimizer state at one moment, to be put back in place.

    Restoring copies into the existing tensors, so that tensors shared with a worker process
    stay shared.
    """

    def __init__(self, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter]):
        self._optimizer = optimizer
        self._parameters = critic_parameters
        self._weights = [param.detach().clone() for param in critic_parameters]
        self._states = [
            {
                key: value.clone() if isinstance(value, th.Tensor) else copy.deepcopy(value)
                for key, value in optimizer.state[param].items()
            }
            if param in optimizer.state
            else None
            for param in critic_parameters
        ]

    def restore(self) -> None:
        with th.no_grad():
            for param, weights in zip(self._parameters, self._weights, strict=True):
                param.copy_(weights)
        for param, saved in zip(self._parameters, self._states, strict=True):
            if saved is None:
                self._optimizer.state.pop(param, None)
                continue
            state = self._optimizer.state[param]
            for key in [key for key in state if key not in saved]:
                del state[key]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(current, th.Tensor) and isinstance(value, th.Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    state[key] = value


class FitStopped(Exception):
    """A fit stopped between two minibatches (the training process took it over).

    :param losses: the losses of the minibatches it fitted, in order
    """

    def __init__(self, losses: list[th.Tensor]):
        super().__init__(f"stopped after {len(losses)} minibatches")
        self.losses = losses


def regress(
    optimizer: th.optim.Optimizer,
    critic_parameters: list[nn.Parameter],
    minibatch_losses: Iterable[Callable[[], th.Tensor]],
    before: CriticSnapshot | None = None,
    losses: list[th.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """One optimizer step per minibatch loss, moving only ``critic_parameters``.

    A fit can stop between two minibatches and be continued by another process that shares the
    weights and the optimizer state: it passes the first one's ``before`` and ``losses`` and the
    remaining minibatches, and computes the same numbers as one uninterrupted fit.

    :param before: the state to put back when a weight becomes non-finite (default: the state now)
    :param losses: the losses of the minibatches fitted before ``minibatch_losses``
    :param stop: asked before each minibatch; :class:`FitStopped` is raised once it returns True
    :return: the mean minibatch loss, or None when a weight became non-finite; the critic
        weights and their optimizer state are then put back as ``before``
    """
    before = before if before is not None else CriticSnapshot(optimizer, critic_parameters)
    losses = list(losses) if losses is not None else []
    try:
        for minibatch_loss in minibatch_losses:
            if stop is not None and stop():
                raise FitStopped(losses)
            loss = minibatch_loss()
            grads = th.autograd.grad(loss, critic_parameters)
            for param, grad in zip(critic_parameters, grads, strict=True):
                param.grad = grad
            optimizer.step()
            losses.append(loss.detach())
    finally:
        for param in critic_parameters:
            param.grad = None
    if critic_parameters and not all(bool(th.isfinite(param).all()) for param in critic_parameters):
        before.restore()
        return None
    return th.stack(losses).mean().item() if losses else float("nan")


def fit_critic(
    policy: BasePolicy,
    optimizer: th.optim.Optimizer,
    critic_parameters: list[nn.Parameter],
    job: CriticFitJob,
    before: CriticSnapshot | None = None,
    losses: list[th.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """Minibatch regression of ``policy.predict_values`` on the returns (see :func:`regress`).

    With ``losses``, the fit continues after its first ``len(losses)`` minibatches.
    """
    for group in optimizer.param_groups:
        group["lr"] = job.learning_rate
    prefer_fused_adam(optimizer)
    observations = _as_tensors(job.observations, policy.device)
    returns = th.as_tensor(job.returns, device=policy.device)

    def minibatch_loss(indices: th.Tensor) -> Callable[[], th.Tensor]:
        def loss() -> th.Tensor:
            values = policy.predict_values(index_observations(observations, indices)).flatten()  # type: ignore[operator]
            return F.mse_loss(returns[indices], values)

        return loss

    n_samples = len(returns)
    minibatches = (
        minibatch_loss(permutation[start : start + job.batch_size])
        for permutation in th.as_tensor(job.permutations, device=policy.device)
        for start in range(0, n_samples, job.batch_size)
    )
    done = 0 if losses is None else len(losses)
    return regress(optimizer, critic_parameters, itertools.islice(minibatches, done, None), before, losses, stop)


# ----------------------------------------------------------------------------- when it can run
def background_unavailable(device: th.device, optimizer_class: type) -> str | None:
    """Why the critic cannot be fitted in a background process here, or None when it can."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork a process"
    if device.type != "cpu":
        return f"it runs on the CPU only, and the policy is on {device}"
    if optimizer_class not in BACKGROUND_OPTIMIZERS:
        return f"it needs Adam or AdamW as the critic's optimizer, not {optimizer_class.__name__}"
    if multiprocessing.current_process().daemon:
        return "this is a daemonic process (a multiprocessing pool's worker), which cannot start one"
    return None


def background_pays() -> bool:
    """Whether ``"auto"`` fits in the background where it can: on Linux, with a second CPU for the worker."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


def check_background_setting(setting: Any, device: th.device, optimizer_class: type) -> None:
    """Refuse a ``background_critic_fit`` that is not True, False or "auto", or True where it cannot run."""
    if setting not in (True, False, "auto") or not isinstance(setting, bool | str):
        raise ValueError(f'background_critic_fit must be True, False or "auto", got {setting!r}')
    reason = background_unavailable(device, optimizer_class) if setting is True else None
    if reason is not None:
        raise ValueError(f'background_critic_fit=True cannot run: {reason}; use False or "auto"')


# ----------------------------------------------------------------------------- the worker process
_HEADER = struct.Struct("!Q")
_POLL_S = 1.0  # how often a waiting process looks at the other one
_STALL_POLLS = 30  # a worker without CPU time for this many polls is hung
_STOP_TIMEOUT_S = 5.0
# "auto" sends a fit to the worker when the previous rollout left at least this many of the
# process's CPUs unused by every other process (idle, or running the worker).
AUTO_MIN_SPARE_CPUS = 0.5
# A shorter interval between a fit and the end of the next rollout tells nothing about the CPUs
# (SB3's rollout loop, which reads the critic at every step, collects the fit before it starts).
_MIN_MEASURED_S = 0.05
PR_SET_PDEATHSIG = 1


class WorkerLost(Exception):
    """The background worker died, hung, failed or lost its connection; the fit it had is not done."""


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


def exit_with_parent(parent_pid: int, forked_by_main_thread: bool) -> None:
    """Have the kernel kill this process when its parent (the process that started it) dies, however it dies."""
    # The kernel's "parent" is the forking thread: only the main thread lives as long as the
    # process. (Otherwise the worker's own polling notices the parent's death.)
    if sys.platform.startswith("linux") and forked_by_main_thread:
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before prctl
        os._exit(0)


def _close_inherited_descriptors(keep: set[int]) -> None:
    """Close every file descriptor inherited from the training process that this worker does not use.

    Pipes held here would keep other processes (SubprocVecEnv workers, another model's
    worker, this worker's own training process end) from seeing the other end close.
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


def _lowest_priority() -> None:
    """Run this process only on CPU time no other process wants (``SCHED_IDLE``, else nice 19)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def _serve(
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
    _close_inherited_descriptors({connection.fileno()})
    # A busy machine gives the worker no time: the training process then takes its fit over
    # at the end of the rollout instead of waiting, and the worker took no time from anyone.
    _lowest_priority()
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


def _ready(connection: socket.socket, write: bool, timeout_s: float) -> bool:
    """Whether ``connection`` can be written (or read, or is closed) within ``timeout_s`` seconds.

    ``poll``, not ``select``: the descriptor's number may be above ``select``'s 1024 (every
    tensor in shared memory keeps a descriptor open).
    """
    poller = select.poll()
    poller.register(connection, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of process ``pid`` in clock ticks, None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _idle_cpu_ticks(cpus: set[int]) -> int | None:
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


@dataclass(frozen=True)
class CpuSample:
    """What the CPUs had done at one moment: to measure the CPU time no other process wanted between two."""

    wall_s: float
    idle_ticks: int | None
    worker: int | None
    worker_ticks: int | None

    @classmethod
    def now(cls, worker: int | None) -> CpuSample:
        """The sample now, for the process's CPUs and the worker process ``worker`` (if one)."""
        ticks = None if worker is None else _cpu_ticks(worker)
        return cls(time.perf_counter(), _idle_cpu_ticks(os.sched_getaffinity(0)), worker, ticks)

    def spare_cpus_since(self, earlier: CpuSample) -> float | None:
        """How many CPUs were, on average since ``earlier``, idle or running the worker (which gets only CPU time
        nobody else wants); None where it cannot tell."""
        wall_s = self.wall_s - earlier.wall_s
        if self.idle_ticks is None or earlier.idle_ticks is None or wall_s < _MIN_MEASURED_S:
            return None
        ticks = self.idle_ticks - earlier.idle_ticks
        if self.worker is not None and self.worker == earlier.worker and None not in (self.worker_ticks, earlier.worker_ticks):
            ticks += self.worker_ticks - earlier.worker_ticks  # type: ignore[operator]
        return ticks / os.sysconf("SC_CLK_TCK") / wall_s


def _stop(process: multiprocessing.process.BaseProcess, connection: socket.socket) -> None:
    """Close the worker's connection (it exits at end of file) and reap it, killing it if it does not exit."""
    connection.close()
    if process.pid is None:
        return
    process.join(_STOP_TIMEOUT_S)
    if process.exitcode is None:
        process.kill()
        process.join()


class BackgroundCriticFit:
    """A forked worker process that fits the critic on weights and Adam state shared with this process.

    The policy's parameters and the critic's Adam state move to shared memory, so the
    worker's updates are the training process's weights and optimizer state. The worker runs
    at the lowest priority (``SCHED_IDLE``), on CPU time no other process wants; a fit it has
    not finished when the training process needs the critic is stopped between two minibatches
    (:meth:`request_stop`) and continued there. The worker ignores Ctrl-C, exits when the
    training process dies (even by SIGKILL), and keeps no file descriptor but its connection.
    Every wait on it here ends: :class:`WorkerLost` is raised when the worker exits, fails, or
    gets no CPU time for ``_STALL_POLLS`` polls.
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
            target=_serve,
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

    def submit(self, job: CriticFitJob) -> None:
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

    def finished(self) -> bool:
        """Whether the worker has replied (or exited): :meth:`result` returns without waiting."""
        return _ready(self._connection, write=False, timeout_s=0)

    def request_stop(self) -> None:
        """Have the worker stop its fit before the next minibatch (:meth:`result` then gives a :class:`FitStopped`)."""
        self._stop_requested[0] = 1

    def result(self) -> float | FitStopped | None:
        """Wait for the worker's reply: the fit's mean loss (None when the weights became non-finite and were
        restored) or, when it was stopped, a :class:`FitStopped`.

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
        ticks, stalled = _cpu_ticks(self._process.pid), 0  # type: ignore[arg-type]
        while not _ready(self._connection, write, _POLL_S):
            if self._process.exitcode is not None:
                raise self._lost("it exited")
            now = _cpu_ticks(self._process.pid)  # type: ignore[arg-type]
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


# ----------------------------------------------------------------------------- the owner
def checked_critic_loss(loss: float | None, update: int) -> float:
    """The loss of a critic fit; :class:`NonFiniteError` when the fit made a weight non-finite (see :func:`regress`)."""
    if loss is None:
        raise NonFiniteError(f"non-finite critic weights after the critic fit of update {update}; they were restored")
    return loss


@dataclass
class _RunningFit:
    """A critic fit not yet collected: in the worker, or stopped there and to be finished in this process."""

    job: CriticFitJob
    update: int
    before: CriticSnapshot  # the critic's state before the fit
    in_worker: bool = True
    losses: list[th.Tensor] = field(default_factory=list)  # of the minibatches fitted, once out of the worker


class CriticFit:
    """The critic fit of every update, in this process or in a background worker: the worker's one owner.

    A background fit runs while the next rollout is collected; its loss (or its error) is
    collected by :meth:`wait`, which the algorithm calls before anything reads the critic:
    the end of the rollout, saving, loading, copying. A fit the worker has not finished
    then is not waited for: the worker stops between two minibatches and this process fits
    the remaining ones (the same numbers: the weights and the optimizer state are shared).
    The worker runs at the lowest priority, so on a busy machine it takes no time from
    other processes and this process does the whole fit, as without a worker.
    A worker that is lost (killed, crashed, hung, or its connection cut by a Ctrl-C) is
    replaced by the same fit in this process, from the critic's state before the lost fit,
    with a warning; the following fits run in this process. Pickling and copying collect a
    running fit and leave the worker out (a copy starts its own).

    :param policy: the policy whose critic is fitted (with its optimizer)
    :param critic_parameters: the parameters the fit moves
    :param background: fit in a forked worker process (:class:`BackgroundCriticFit`), started at the first fit
    :param adaptive: ``background_critic_fit="auto"``: send a fit to the worker only when the
        previous rollout left at least :data:`AUTO_MIN_SPARE_CPUS` of the process's CPUs to
        nobody else (idle, or running the worker), from ``/proc/stat`` (the first rollout is
        measured from construction); every fit while other processes keep the CPUs busy runs
        in this process, and the worker is started only once a fit goes to it. The results
        are the same either way
    """

    def __init__(self, policy: BasePolicy, critic_parameters: list[nn.Parameter], background: bool, adaptive: bool = False):
        self.policy = policy
        self.critic_parameters = critic_parameters
        self.background = background
        self.adaptive = adaptive
        self._worker: BackgroundCriticFit | None = None
        self._running: _RunningFit | None = None
        self._finished: tuple[int, float | None] | None = None
        self._spare_cpu = False  # with adaptive: the last rollout left a CPU to the worker
        # The first rollout is measured from the model's construction.
        self._rollout_start = CpuSample.now(None) if self._measures_cpus else None

    @property
    def worker(self) -> BackgroundCriticFit | None:
        """The background worker, once started (None again once it is stopped or lost)."""
        return self._worker

    @property
    def _measures_cpus(self) -> bool:
        return self.adaptive and self.background

    def run(self, job: CriticFitJob, update: int, overlap: bool = True) -> float | None:
        """Fit the critic of ``update`` on ``job``; the mean loss, or None when the fit runs in the background.

        :param overlap: whether a rollout follows that the fit can overlap with (not after the last update of
            ``learn``: the fit then runs here)
        """
        self.collect()
        try:
            if not (self.background and overlap and (self._spare_cpu or not self.adaptive)):
                return checked_critic_loss(self._fit_here(job), update)
            running = _RunningFit(job, update, CriticSnapshot(self.policy.optimizer, self.critic_parameters))
            self._running = running
            try:
                if self._worker is None:
                    self._worker = BackgroundCriticFit(self.policy, self.policy.optimizer, self.critic_parameters)
                self._worker.submit(job)
            except WorkerLost as error:
                self._lose_worker(running, error)
                return self.wait()
            return None
        finally:
            if self._measures_cpus:
                self._rollout_start = CpuSample.now(None if self._worker is None else self._worker.pid)

    def wait(self, rollout_end: bool = False) -> float | None:
        """Collect a fit running in the background; its mean loss, or None when none ran since the last wait.

        :param rollout_end: this is the end of the rollout that followed the fit (with
            ``adaptive``, the CPU time it left to nobody else decides where the next fit runs)
        """
        if rollout_end and self._measures_cpus and self._rollout_start is not None:
            spare = CpuSample.now(self._rollout_start.worker).spare_cpus_since(self._rollout_start)
            if spare is not None:
                self._spare_cpu = spare >= AUTO_MIN_SPARE_CPUS
        self.collect()
        finished, self._finished = self._finished, None
        return None if finished is None else checked_critic_loss(finished[1], finished[0])

    def close(self) -> None:
        """Collect a running fit (its loss is kept for :meth:`wait`) and stop the worker; the next fit starts a new one."""
        self.collect()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def collect(self) -> None:
        """Finish a fit running in the background: take the worker's result, or stop the worker and fit the rest here.

        Its loss is kept for :meth:`wait`. Interrupted (Ctrl-C), the fit is left to the next call.
        """
        running = self._running
        if running is None:
            return
        if running.in_worker:
            outcome = self._from_worker(running)
            if not isinstance(outcome, FitStopped):
                self._running, self._finished = None, (running.update, outcome)
                return
            running.in_worker, running.losses = False, outcome.losses
        try:
            loss = self._fit_here(running.job, running.before, running.losses)
        except BaseException:
            # Interrupted between two optimizer steps or within one: fit again from the start.
            running.before.restore()
            running.losses = []
            raise
        self._running, self._finished = None, (running.update, loss)

    def _from_worker(self, running: _RunningFit) -> float | FitStopped | None:
        """The worker's loss for ``running``, or what it fitted when stopped (nothing when it was lost)."""
        try:
            if self._worker is None or not self._worker.alive:
                raise WorkerLost("its connection was cut in the middle of a message")
            if not self._worker.finished():
                self._worker.request_stop()
            outcome = self._worker.result()
        except WorkerLost as error:
            self._lose_worker(running, error)
            return FitStopped([])
        return outcome

    def _fit_here(
        self, job: CriticFitJob, before: CriticSnapshot | None = None, losses: list[th.Tensor] | None = None
    ) -> float | None:
        return fit_critic(self.policy, self.policy.optimizer, self.critic_parameters, job, before, losses)

    def _lose_worker(self, running: _RunningFit, error: WorkerLost) -> None:
        """Stop using the worker; ``running`` is fitted here from the critic's state before it."""
        warnings.warn(
            f"the background critic fit of update {running.update} was lost: {error}. The critic is fitted in the "
            "training process instead, from the same state (same result), and will be from now on.",
            RuntimeWarning,
            stacklevel=4,
        )
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self.background = False
        running.before.restore()
        running.in_worker, running.losses = False, []

    def __getstate__(self) -> dict[str, Any]:
        self.collect()
        return {**self.__dict__, "_worker": None}
