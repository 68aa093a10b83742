"""rl-zoo3's train and enjoy with this package's algorithms.

``python -m sb3_trpo.zoo train --algo trpo --env Pendulum-v1 [any rl-zoo3 train option]``
``python -m sb3_trpo.zoo enjoy --algo trpo --env Pendulum-v1 -f logs/ [any rl-zoo3 enjoy option]``

``train -optimize`` takes four options of its own: ``--enqueue-entry``, the config entry of
``--env`` becomes a trial of the study (``--storage`` and ``--study-name`` needed) before
rl-zoo3's sampler proposes any; ``--heartbeat-interval`` and ``--grace-period``, the
seconds of Optuna's heartbeat with which an RDB storage is opened (a trial without a
heartbeat for the grace period has lost its worker: it is failed and run again), and
``--max-retry``, how many times such a trial is run again.
Workers started together on an empty storage are safe: the storage is opened and the
entry enqueued under a lock (:func:`sb3_trpo.tuning.storage.storage_lock`). SIGINT or SIGTERM
stops a worker (:class:`sb3_trpo.tuning.signals.SignalStop`): its running trials become FAIL
(the reason in their ``fail_reason`` system attribute) and are enqueued again, rl-zoo3
writes its report, and the exit status is 128 + the signal number; it is 0 when no trial
was stopped. Stopped before any trial of the study completed, the worker says so in one
line and exits with the same status: there is no best trial to report.

Before rl-zoo3 parses the command line, ``trpo`` (and ``npg``, and the variants the
package defines) are bound to this package's classes, samplers and converter, and
``sb3_trpo/zoo_configs/<algo>.yml`` becomes the config unless ``--conf-file`` names one.
Bad input (unknown environment, unknown or invalid hyperparameter, unusable storage)
stops the run with a message before any training and before the study is opened.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import optuna
import rl_zoo3.train
from rl_zoo3.enjoy import enjoy as rl_zoo3_enjoy
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER
from rl_zoo3.utils import ALGOS
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

import sb3_trpo
from sb3_trpo.hyperparams import (
    Sampler,
    config_entry,
    entry_params,
    sample_acktr_params,
    sample_npg_params,
    sample_trpo_lstm_params,
    sample_trpo_mask_params,
    sample_trpo_params,
    target_kl_schedule,
)
from sb3_trpo.tuning.signals import SignalStop, SignalStopCallback
from sb3_trpo.tuning.storage import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    check_env_id,
    check_fault_options,
    check_storage,
    enqueue_unless_measured,
    open_storage,
    storage_lock,
)

CONFIG_DIR = Path(__file__).parent / "zoo_configs"
PROG = "python -m sb3_trpo.zoo"
# This package's train options, taken off the command line before rl-zoo3 parses them.
ENQUEUE_ENTRY = "--enqueue-entry"
HEARTBEAT_INTERVAL = "--heartbeat-interval"
GRACE_PERIOD = "--grace-period"
MAX_RETRY = "--max-retry"
# The callback that stops a trial at its next step, by the name rl-zoo3's "callback" entry takes.
STOP_CALLBACK = f"{SignalStopCallback.__module__}.{SignalStopCallback.__name__}"
# Constructor arguments that rl-zoo3 sets from its command line, never from a config.
SET_BY_RL_ZOO3 = ("env", "tensorboard_log", "seed", "verbose", "device")


@dataclass(frozen=True)
class ZooAlgorithm:
    """
    How one algorithm of the package is offered to rl-zoo3.

    :param class_name: name of the class in the ``sb3_trpo`` package; the entry is
        registered only when the package defines it
    :param sampler: Optuna sampler in rl-zoo3's signature
    :param config: default config file, in ``sb3_trpo/zoo_configs``
    """

    class_name: str
    sampler: Sampler
    config: str = "trpo.yml"


ZOO_ALGORITHMS: dict[str, ZooAlgorithm] = {
    "trpo": ZooAlgorithm("TRPO", sample_trpo_params),
    "npg": ZooAlgorithm("NPG", sample_npg_params),
    "trpo_lstm": ZooAlgorithm("RecurrentTRPO", sample_trpo_lstm_params, "trpo_lstm.yml"),
    "trpo_mask": ZooAlgorithm("MaskableTRPO", sample_trpo_mask_params, "trpo_mask.yml"),
    "acktr": ZooAlgorithm("ACKTR", sample_acktr_params, "acktr.yml"),
}

# The demonstration task of trpo_mask: an environment with action_masks().
MASKED_DEMO_ENV = "InvalidActionEnvDiscrete-v0"
if MASKED_DEMO_ENV not in gym.registry:
    gym.register(
        MASKED_DEMO_ENV,
        entry_point="sb3_contrib.common.envs:InvalidActionEnvDiscrete",
        kwargs=dict(dim=20, n_invalid_actions=10),
        max_episode_steps=500,
    )


class ZooInputError(ValueError):
    """Bad input found before training: the run stops with this message."""


def register() -> list[str]:
    """
    Bind the algorithms of :data:`ZOO_ALGORITHMS` that the package defines in rl-zoo3's
    ``ALGOS``, ``HYPERPARAMS_SAMPLER`` and ``HYPERPARAMS_CONVERTER`` (``trpo`` replaces
    sb3-contrib's TRPO there).

    :return: the names registered
    """
    registered = []
    for name, algorithm in ZOO_ALGORITHMS.items():
        algorithm_class = getattr(sb3_trpo, algorithm.class_name, None)
        if algorithm_class is None:
            continue
        # rl-zoo3's dicts are typed after their first entries, parameter names included.
        ALGOS[name] = algorithm_class
        HYPERPARAMS_SAMPLER[name] = algorithm.sampler  # type: ignore[assignment]
        # rl-zoo3's --trial-id reads a trial through this; a config entry keeps the saved config.yml plain YAML.
        HYPERPARAMS_CONVERTER[name] = config_entry  # type: ignore[assignment]
        registered.append(name)
    return registered


def check_constructor_arguments(
    algorithm_class: type[BaseAlgorithm], hyperparams: dict[str, Any], make_env: Callable[[], VecEnv], where: str
) -> gym.Space:
    """
    Raise :class:`ZooInputError` unless ``algorithm_class(env=make_env(), **hyperparams)`` builds.

    Unknown names are reported with the closest known ones; invalid values with the
    constructor's own message. The model is built once on CPU and thrown away.

    :param algorithm_class: the class rl-zoo3 will construct
    :param hyperparams: the config entry after rl-zoo3's preprocessing (schedules, ``policy_kwargs`` evaluated)
    :param make_env: builds the environment the way rl-zoo3 does
    :param where: where the hyperparameters come from, for the message
    :return: the environment's action space
    """
    known = [name for name in inspect.signature(algorithm_class).parameters if name not in SET_BY_RL_ZOO3]
    for name in hyperparams:
        if name in SET_BY_RL_ZOO3:
            raise ZooInputError(f"{name!r} in {where} is set by rl-zoo3's command line, not by the config")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=2)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else f"; known: {', '.join(known)}"
            raise ZooInputError(f"unknown hyperparameter {name!r} for {algorithm_class.__name__} in {where}{hint}")
    env = make_env()
    try:
        algorithm_class(env=env, device="cpu", **hyperparams)
    except (ValueError, TypeError, AssertionError, KeyError) as error:
        raise ZooInputError(f"invalid hyperparameter in {where}: {error}") from error
    finally:
        env.close()
    return env.action_space


class CheckedExperimentManager(ExperimentManager):
    """rl-zoo3's experiment manager, stopping on bad input before it trains or opens a study,
    and tuning in a way that survives the death or the stop of a worker.

    :param args: rl-zoo3's positional arguments
    :param enqueue_entry: an optimization first enqueues the config entry itself as a trial
        of the study (unless a trial of it finished, runs or waits), so that the study
        measures what it starts from and its best trial is never worse than that on the
        study's budget
    :param heartbeat_interval: seconds between the heartbeats of a running trial in an RDB storage
    :param grace_period: seconds without a heartbeat after which a running trial counts as
        dead: it is failed and enqueued again when a worker next starts a trial
    :param max_retry: how many times a trial whose worker died or was stopped is run again
    :param kwargs: rl-zoo3's keyword arguments
    """

    _entry_params: dict[str, Any]

    def __init__(
        self,
        *args: Any,
        enqueue_entry: bool = False,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
        grace_period: int = DEFAULT_GRACE_PERIOD,
        max_retry: int = DEFAULT_MAX_RETRY,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.enqueue_entry = enqueue_entry
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self._stop = SignalStop(max_retry)

    @staticmethod
    def _preprocess_schedules(hyperparams: dict[str, Any]) -> dict[str, Any]:
        # rl-zoo3 turns "lin_<value>" into schedules for its own keys only; target_kl's has a floor (target_kl_schedule).
        hyperparams = ExperimentManager._preprocess_schedules(hyperparams)
        if isinstance(hyperparams.get("target_kl"), str):
            hyperparams["target_kl"] = target_kl_schedule(hyperparams["target_kl"])
        return hyperparams

    def _preprocess_hyperparams(self, hyperparams: dict[str, Any]) -> tuple[Any, ...]:
        # rl-zoo3 calls this first in setup_experiment: before it makes folders, environments or models.
        where = f"the hyperparameters for {self.env_name.gym_id} from {self.config}"
        if self.custom_hyperparams:
            where += " and -params"
        try:
            processed = super()._preprocess_hyperparams(hyperparams)
        except SyntaxError as error:
            raise ZooInputError(f"invalid hyperparameter in {where}: cannot evaluate {error.text!r}: {error.msg}") from error
        except (ValueError, NameError, AttributeError) as error:
            raise ZooInputError(f"invalid hyperparameter in {where}: {error}") from error
        kwargs, self.env_wrapper, _, self.vec_env_wrapper = processed
        action_space = check_constructor_arguments(ALGOS[self.algo], kwargs, lambda: self.create_envs(1, no_log=True), where)
        if self.optimize_hyperparameters:
            try:
                check_storage(self.storage)
            except ValueError as error:
                raise ZooInputError(str(error)) from error
            if self.enqueue_entry:
                self._entry_params = self._checked_entry_params(kwargs, action_space)
        return processed

    def _checked_entry_params(self, hyperparams: dict[str, Any], action_space: gym.Space) -> dict[str, Any]:
        if self.storage is None or self.study_name is None:
            raise ZooInputError(f"{ENQUEUE_ENTRY} needs --storage and --study-name: the entry is enqueued in that study")
        # As rl-zoo3 computes the sampler's n_actions.
        n_actions = action_space.shape[0] if isinstance(action_space, gym.spaces.Box) else 0
        try:
            return entry_params(HYPERPARAMS_SAMPLER[self.algo], hyperparams, ALGOS[self.algo], n_actions)
        except ValueError as error:
            raise ZooInputError(f"{ENQUEUE_ENTRY}: {error}") from error

    def hyperparameters_optimization(self) -> None:
        storage = None
        if self.storage is not None:
            storage = open_storage(self.storage, self.heartbeat_interval, self.grace_period, self.max_retry)
            if self.enqueue_entry:
                with storage_lock(self.storage):
                    study = optuna.create_study(
                        storage=storage, study_name=self.study_name, load_if_exists=True, direction="maximize"
                    )
                    enqueue_unless_measured(study, self._entry_params)
        studies: list[optuna.Study] = []
        create_study = optuna.create_study

        def create_here(**kwargs: Any) -> optuna.Study:
            # rl-zoo3 opens its study from the URL; it gets the storage opened here, with heartbeats.
            studies.append(create_study(**{**kwargs, **({"storage": storage} if storage else {})}))
            return studies[-1]

        # A trial in a thread of its own (--n-jobs > 1) stops at its next step through this callback.
        self.specified_callbacks = [*_as_list(self.specified_callbacks), {STOP_CALLBACK: {"stop": self._stop}}]
        try:
            with _replaced(optuna, "create_study", create_here), self._stop.handling():
                super().hyperparameters_optimization()
        except ValueError:
            # rl-zoo3's report begins with the study's best trial, which only a completed trial makes.
            completed = studies and studies[0].get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if self._stop.signum is None or completed:
                raise
            print(f"{self._stop.summary()}; no trial of the study has completed: no best trial, no report", file=sys.stderr)
            sys.exit(128 + self._stop.signum)
        if self._stop.exit_status:
            print(self._stop.summary(), file=sys.stderr)
            sys.exit(self._stop.exit_status)

    def objective(self, trial: optuna.Trial) -> float:
        return self._stop.stoppable(super().objective)(trial)


def _as_list(callbacks: Any) -> list[Any]:
    """rl-zoo3's ``callback`` entry (none, one, or a list) as a list."""
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, list) else [callbacks]


@contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _peek(argv: Sequence[str]) -> argparse.Namespace:
    """The few rl-zoo3 train options needed before rl-zoo3 runs, with rl-zoo3's defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("--gym-packages", nargs="+", default=[])
    return parser.parse_known_args(argv)[0]


def _study_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """This package's train options (keyword arguments of the manager), and the arguments left for rl-zoo3."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument(ENQUEUE_ENTRY, action="store_true")
    parser.add_argument(HEARTBEAT_INTERVAL, type=int, default=DEFAULT_HEARTBEAT_INTERVAL)
    parser.add_argument(GRACE_PERIOD, type=int, default=DEFAULT_GRACE_PERIOD)
    parser.add_argument(MAX_RETRY, type=int, default=DEFAULT_MAX_RETRY)
    try:
        options, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ZooInputError(str(error)) from error
    if not {"-optimize", "--optimize-hyperparameters"} & set(rest):
        for name in (ENQUEUE_ENTRY, HEARTBEAT_INTERVAL, GRACE_PERIOD, MAX_RETRY):
            if any(arg.split("=")[0] == name for arg in argv):
                raise ZooInputError(f"{name} is an option of tuning: it needs -optimize")
    try:
        check_fault_options(options.heartbeat_interval, options.grace_period, options.max_retry, as_options=True)
    except ValueError as error:
        raise ZooInputError(str(error)) from error
    return vars(options), rest


def _train_arguments(argv: list[str], registered: list[str]) -> list[str]:
    options = _peek(argv)
    for module in options.gym_packages:
        importlib.import_module(module)
    try:
        check_env_id(options.env)
    except ValueError as error:
        raise ZooInputError(str(error)) from error
    if options.conf_file is None and options.algo in registered:
        return [*argv, "--conf-file", str(CONFIG_DIR / ZOO_ALGORITHMS[options.algo].config)]
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run rl-zoo3's ``train`` or ``enjoy`` with this package's algorithms registered.

    :param argv: ``["train" | "enjoy", *rl-zoo3 arguments]``; ``sys.argv[1:]`` when ``None``
    """
    args = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[], None]] = {"train": rl_zoo3.train.train, "enjoy": rl_zoo3_enjoy}
    usage = (
        f"usage: {PROG} {{train,enjoy}} [rl-zoo3 arguments; see {PROG} train --help]\n"
        f"train -optimize also takes {ENQUEUE_ENTRY}: the config entry of --env becomes a trial of the study;\n"
        f"{HEARTBEAT_INTERVAL} SECONDS (default {DEFAULT_HEARTBEAT_INTERVAL}) and {GRACE_PERIOD} SECONDS "
        f"(default {DEFAULT_GRACE_PERIOD}): a trial of an RDB storage without a heartbeat for the grace period "
        f"has lost its worker; it is failed and run again, at most {MAX_RETRY} N times (default {DEFAULT_MAX_RETRY}; "
        "0: never), as is a trial of a worker stopped by SIGINT or SIGTERM"
    )
    if args[:1] in (["-h"], ["--help"]):
        print(usage)
        return
    if not args or args[0] not in commands:
        sys.exit(usage)
    command, rest = args[0], args[1:]
    registered = register()
    saved_argv, saved_manager = sys.argv, rl_zoo3.train.ExperimentManager
    try:
        manager: Callable[..., CheckedExperimentManager] = CheckedExperimentManager
        if command == "train":
            options, rest = _study_options(rest)
            manager = functools.partial(CheckedExperimentManager, **options)
            rest = _train_arguments(rest, registered)
        # rl-zoo3 parses sys.argv; the manager is looked up in rl_zoo3.train when train() runs.
        sys.argv = [f"{PROG} {command}", *rest]
        rl_zoo3.train.ExperimentManager = manager  # type: ignore[misc,assignment]
        commands[command]()
    except ZooInputError as error:
        sys.exit(f"{PROG} {command}: error: {error}")
    finally:
        sys.argv, rl_zoo3.train.ExperimentManager = saved_argv, saved_manager  # type: ignore[misc]


if __name__ == "__main__":
    main()
