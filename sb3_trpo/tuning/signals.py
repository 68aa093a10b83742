"""SIGINT and SIGTERM stop a tuning worker: its running trials become FAIL and are enqueued again.

:class:`SignalStop` handles the signals around ``study.optimize``; :class:`SignalStopCallback`
stops a trial that trains outside the main thread at its next step.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import optuna
from stable_baselines3.common.callbacks import BaseCallback

from sb3_trpo.tuning.storage import DEFAULT_MAX_RETRY

_Value = TypeVar("_Value")


class WorkerStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a tuning worker: raised in each trial it runs.

    A ``KeyboardInterrupt``, so that Optuna fails the trial and ends the optimization as on
    Ctrl-C (rl-zoo3 then writes its report).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """
    SIGINT and SIGTERM stop an Optuna worker and leave none of its trials RUNNING.

    Each trial the worker runs becomes FAIL, the reason in its ``fail_reason`` system
    attribute (``worker stopped by SIGTERM``), and, in a storage that outlives the worker, is
    enqueued again with the same parameters as a dead worker's trial is (Optuna's
    ``RetryHeartbeatStaleTrialCallback``, at most ``max_retry`` times); then
    :class:`WorkerStopped`, a ``KeyboardInterrupt``, comes out of ``study.optimize``::

        stop = SignalStop()
        with stop.handling():
            try:
                study.optimize(stop.stoppable(objective), n_jobs=2)
            except WorkerStopped:
                print(stop.summary())
        sys.exit(stop.exit_status)

    A trial in the main thread (``n_jobs=1``) is interrupted at once, as by Ctrl-C. Python
    cannot interrupt another thread: a trial there (``n_jobs > 1``) stops at its next
    training step when its ``learn`` has a :class:`SignalStopCallback`; without one it runs
    to its end. The main thread, in Optuna's loop then, starts no further trial.

    :param max_retry: how many times a trial is run again after its worker died or was stopped
    """

    def __init__(self, max_retry: int = DEFAULT_MAX_RETRY):
        self.max_retry = max_retry
        # The first signal received, the numbers of the trials it stopped and of those enqueued again.
        self.signum: int | None = None
        self.stopped_trials: list[int] = []
        self.enqueued_again: list[int] = []
        # Threads running a trial; set operations are atomic, and the handler must not wait on a lock.
        self._running: set[int] = set()

    @property
    def exit_status(self) -> int:
        """128 + the signal number when the signal stopped a trial (130 for SIGINT, 143 for SIGTERM), else 0."""
        return 128 + self.signum if self.signum is not None and self.stopped_trials else 0

    def summary(self) -> str:
        """One line: the signal and what it did, e.g. ``Stopped by SIGTERM: trial 3 failed and enqueued again``."""
        assert self.signum is not None, "no signal received"
        name = signal.Signals(self.signum).name
        if not self.stopped_trials:
            return f"Stopped by {name}: no trial was running"
        line = f"Stopped by {name}: {_trials(self.stopped_trials)} failed"
        if sorted(self.enqueued_again) == sorted(self.stopped_trials):
            return line + " and enqueued again"
        return line + (f", {_trials(self.enqueued_again)} enqueued again" if self.enqueued_again else "")

    def check(self) -> None:
        """Raise :class:`WorkerStopped` once a signal was received; called in a trial."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)

    def stoppable(self, objective: Callable[[optuna.Trial], _Value]) -> Callable[[optuna.Trial], _Value]:
        """The objective, failing its trial as the class says when a signal stops it (or came before it began)."""

        def stoppable_objective(trial: optuna.Trial) -> _Value:
            thread = threading.get_ident()
            try:
                self._running.add(thread)
                self.check()
                return objective(trial)
            except WorkerStopped as stop:
                self._fail(trial, stop)
                raise
            finally:
                self._running.discard(thread)

        return stoppable_objective

    def _fail(self, trial: optuna.Trial, stop: WorkerStopped) -> None:
        """Enqueue the trial again, as for a dead worker, and say why it fails (Optuna fails it next)."""
        self.stopped_trials.append(trial.number)
        # Optuna's storage API names a trial by its id, which no public attribute gives
        # (Trial and FrozenTrial keep it as _trial_id; Optuna 5 removed Trial.set_system_attr).
        trial_id = trial._trial_id
        if not isinstance(trial.storage, optuna.storages.InMemoryStorage):  # else nobody would run it again
            frozen = trial.storage.get_trial(trial_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)
                retry(trial.study, frozen)
                # The callback's rule: a trial already run again max_retry times is not.
                if len(retry.retry_history(frozen)) < self.max_retry:
                    self.enqueued_again.append(trial.number)
        trial.storage.set_trial_system_attr(trial_id, "fail_reason", f"worker stopped by {stop}")

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside the block; the previous handlers come back after it.

        Installed whatever the inherited handlers: a worker started with ``&`` by a script
        inherits an ignored SIGINT. Optuna's log of a stopped trial keeps its line, not the
        traceback: a stop is not a crash.
        """

        def received(signum: int, frame: Any) -> None:
            first = self.signum is None
            if first:
                self.signum = signum
            # Only once: a second signal must not interrupt the bookkeeping of the first.
            if first and self._running:
                raise WorkerStopped(signum)

        previous = {signum: signal.signal(signum, received) for signum in (signal.SIGINT, signal.SIGTERM)}
        log_handlers = logging.getLogger("optuna").handlers
        for log_handler in log_handlers:
            log_handler.addFilter(_without_stop_traceback)
        try:
            yield
        finally:
            for log_handler in log_handlers:
                log_handler.removeFilter(_without_stop_traceback)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _trials(numbers: list[int]) -> str:
    return ("trial " if len(numbers) == 1 else "trials ") + ", ".join(map(str, sorted(numbers)))


def _without_stop_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info is not None and isinstance(record.exc_info[1], WorkerStopped):
        record.exc_info = None
    return True


class SignalStopCallback(BaseCallback):
    """
    Raise :class:`WorkerStopped` at the first training step after a signal reached ``stop``:
    how a trial that runs outside the main thread stops (see :class:`SignalStop`).

    :param stop: the worker's signal handling
    """

    def __init__(self, stop: SignalStop):
        super().__init__()
        self.stop = stop

    def _on_step(self) -> bool:
        self.stop.check()
        return True
