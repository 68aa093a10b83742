"""Where each critic fit runs: in the training process or in the background worker, and what happens when
the worker is lost.

TRPO fits its critic after the trust-region step, and the next rollout does not need the
critic until its end (values are computed in one batched pass after the rollout). So the
fit can run in a second process (:class:`~sb3_trpo.common.critic_worker.CriticWorker`) while
the next rollout is collected, on CPU time no other process wants. :class:`CriticFitter`
owns that choice and the worker's whole lifecycle: the algorithm calls
:meth:`CriticFitter.start`, :meth:`CriticFitter.finish` (then :meth:`CriticFitter.take_loss`)
and :meth:`CriticFitter.close`.
Both processes run :func:`~sb3_trpo.common.critic.fit_critic` on the same weights and
optimizer state, with the same minibatch order, so they compute the same numbers, and a fit
the worker has not finished when the critic is needed is stopped between two minibatches and
finished in this process. A worker that dies, hangs or fails is replaced by the fit in this
process, from the state the critic had before the lost fit.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch as th
from stable_baselines3.common.policies import BasePolicy
from torch import nn

from sb3_trpo.common.critic import CriticJob, CriticSnapshot, FitStopped, checked_critic_loss, fit_critic
from sb3_trpo.common.critic_worker import CriticWorker, WorkerLost, background_unavailable
from sb3_trpo.common.os_process import cpu_ticks, idle_cpu_ticks

BackgroundSetting = bool | Literal["auto"]
# "auto" sends a fit to the worker when the previous rollout left at least this many of the
# process's CPUs unused by every other process (idle, or running the worker).
AUTO_MIN_SPARE_CPUS = 0.5
# A shorter interval between a fit and the end of the next rollout tells nothing about the CPUs
# (SB3's rollout loop, which reads the critic at every step, finishes the fit before it starts).
_MIN_MEASURED_S = 0.05


# ----------------------------------------------------------------------------- the setting
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
        ticks = None if worker is None else cpu_ticks(worker)
        return cls(time.perf_counter(), idle_cpu_ticks(os.sched_getaffinity(0)), worker, ticks)

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


# ----------------------------------------------------------------------------- the owner
@dataclass
class _StartedJob:
    """A job started and not finished: in the worker, or stopped there and to be finished in this process."""

    job: CriticJob
    update: int
    before: CriticSnapshot  # the critic's state before the fit
    in_worker: bool = True
    losses: list[th.Tensor] = field(default_factory=list)  # of the minibatches fitted, once out of the worker


class CriticFitter:
    """The critic fit of every update, in this process or in a background worker: the worker's one owner.

    A background fit runs while the next rollout is collected; the algorithm calls :meth:`finish`
    before anything reads the critic (the end of the rollout, saving, loading, copying) and
    logs the loss that :meth:`take_loss` then gives (or raises its error). A fit the worker has not finished
    then is not waited for: the worker stops between two minibatches and this process fits
    the remaining ones (the same numbers: the weights and the optimizer state are shared).
    The worker runs at the lowest priority, so on a busy machine it takes no time from
    other processes and this process does the whole fit, as without a worker.
    A worker that is lost (killed, crashed, hung, or its connection cut by a Ctrl-C) is
    replaced by the same fit in this process, from the critic's state before the lost fit,
    with a warning; the following fits run in this process. Pickling and copying finish a
    started fit and leave the worker out (a copy starts its own).

    :param policy: the policy whose critic is fitted (with its optimizer)
    :param critic_parameters: the parameters the fit moves
    :param background: fit in a forked worker process (:class:`~sb3_trpo.common.critic_worker.CriticWorker`),
        started at the first fit that goes to it
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
        self.adaptive = adaptive
        self._background = background
        self._worker: CriticWorker | None = None
        self._started: _StartedJob | None = None
        self._finished: tuple[int, float | None] | None = None  # (update, loss) not yet taken by take_loss()
        self._spare_cpu = False  # with adaptive: the last rollout left a CPU to the worker
        # The first rollout is measured from the model's construction.
        self._rollout_start = CpuSample.now(None) if self._measures_cpus else None

    @property
    def background(self) -> bool:
        """Whether fits may go to the background worker (False for good once a worker was lost)."""
        return self._background

    @property
    def worker(self) -> CriticWorker | None:
        """The background worker, once started (None again once it is stopped or lost)."""
        return self._worker

    @property
    def in_progress(self) -> bool:
        """Whether a fit was started in the background and not finished: :meth:`finish` has work to do."""
        return self._started is not None

    @property
    def _measures_cpus(self) -> bool:
        return self.adaptive and self._background

    def start(self, job: CriticJob, update: int, overlap: bool = True) -> float | None:
        """Start the critic fit of ``update`` on ``job``: its mean loss, or None when it runs in the background.

        :param overlap: whether a rollout follows that the fit can overlap with (not after the last update of
            ``learn``: the fit then runs here)
        """
        self.finish()
        try:
            if not (self._background and overlap and (self._spare_cpu or not self.adaptive)):
                return checked_critic_loss(self._fit_here(job), update)
            started = _StartedJob(job, update, CriticSnapshot(self.policy.optimizer, self.critic_parameters))
            self._started = started
            try:
                if self._worker is None:
                    self._worker = CriticWorker(self.policy, self.policy.optimizer, self.critic_parameters)
                self._worker.send(job)
            except WorkerLost as error:
                self._lose_worker(started, error)
                self.finish()
                return self.take_loss()
            return None
        finally:
            if self._measures_cpus:
                self._rollout_start = CpuSample.now(None if self._worker is None else self._worker.pid)

    def finish(self, rollout_end: bool = False) -> None:
        """Finish a fit started in the background: take the worker's result, or stop the worker and fit the rest here.

        Its loss is kept for :meth:`take_loss`. Interrupted (Ctrl-C), the fit is left to the next call.

        :param rollout_end: this is the end of the rollout that followed the fit (with
            ``adaptive``, the CPU time it left to nobody else decides where the next fit runs)
        """
        if rollout_end and self._measures_cpus and self._rollout_start is not None:
            spare = CpuSample.now(self._rollout_start.worker).spare_cpus_since(self._rollout_start)
            if spare is not None:
                self._spare_cpu = spare >= AUTO_MIN_SPARE_CPUS
        started = self._started
        if started is None:
            return
        if started.in_worker:
            outcome = self._from_worker(started)
            if not isinstance(outcome, FitStopped):
                self._started, self._finished = None, (started.update, outcome)
                return
            started.in_worker, started.losses = False, outcome.losses
        try:
            loss = self._fit_here(started.job, started.before, started.losses)
        except BaseException:
            # Interrupted between two optimizer steps or within one: fit again from the start.
            started.before.restore()
            started.losses = []
            raise
        self._started, self._finished = None, (started.update, loss)

    def take_loss(self) -> float | None:
        """The mean loss of the last background fit finished since the last call, or None when there is none.

        :raises NonFiniteError: when that fit made a weight non-finite (the critic's state before it was restored)
        """
        finished, self._finished = self._finished, None
        return None if finished is None else checked_critic_loss(finished[1], finished[0])

    def close(self) -> None:
        """Finish a started fit (its loss is kept for :meth:`take_loss`) and stop the worker; the next fit starts a new one."""
        self.finish()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _from_worker(self, started: _StartedJob) -> float | FitStopped | None:
        """The worker's loss for ``started``, or what it fitted when stopped (nothing when it was lost)."""
        try:
            if self._worker is None or not self._worker.alive:
                raise WorkerLost("its connection was cut in the middle of a message")
            if not self._worker.replied():
                self._worker.request_stop()
            outcome = self._worker.receive()
        except WorkerLost as error:
            self._lose_worker(started, error)
            return FitStopped([])
        return outcome

    def _fit_here(
        self, job: CriticJob, before: CriticSnapshot | None = None, losses: list[th.Tensor] | None = None
    ) -> float | None:
        return fit_critic(self.policy, self.policy.optimizer, self.critic_parameters, job, before, losses)

    def _lose_worker(self, started: _StartedJob, error: WorkerLost) -> None:
        """Stop using the worker; ``started`` is fitted here from the critic's state before it."""
        warnings.warn(
            f"the background critic fit of update {started.update} was lost: {error}. The critic is fitted in the "
            "training process instead, from the same state (same result), and will be from now on.",
            RuntimeWarning,
            stacklevel=4,
        )
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self._background = False
        started.before.restore()
        started.in_worker, started.losses = False, []

    def __getstate__(self) -> dict[str, Any]:
        self.finish()
        return {**self.__dict__, "_worker": None}
