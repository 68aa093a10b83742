"""Optuna search spaces for NPG and TRPO, and the way back from a trial to a config entry.

The samplers have rl-zoo3's signature ``(trial, n_actions, n_envs, additional_args) -> dict``
and return constructor arguments. Every trial also carries, as user attributes, the
rl-zoo3 config entry its parameters stand for, so the best trial of a study is a config.
The helpers at the end let workers share a study and survive the death of one of them
(:func:`open_storage`) or its stop by SIGINT or SIGTERM (:class:`SignalStop`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

if TYPE_CHECKING:
    import optuna

# rl-zoo3's sampler signature: (trial, n_actions, n_envs, additional_args) -> constructor arguments.
Sampler = Callable[["optuna.Trial", int, int, dict], dict[str, Any]]

# Actor and critic get the same hidden layers (``net_arch=dict(pi=..., vf=...)``).
NET_ARCHS: dict[str, list[int]] = {"tiny": [64], "small": [64, 64], "medium": [256, 256]}
ACTIVATION_FNS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
LSTM_HIDDEN_SIZES = (16, 32, 64, 128, 256)

# Sampled parameters stored as exponents or complements, and the hyperparameter each gives.
_POWERS_OF_TWO = {"n_steps_pow": "n_steps", "batch_size_pow": "batch_size"}
_COMPLEMENTS = {"one_minus_gamma": "gamma", "one_minus_gae_lambda": "gae_lambda"}
# A linear target_kl schedule ends at this fraction of its start: a trust region of radius 0 takes no step.
TARGET_KL_END_FRACTION = 0.1
_POLICY_PARAMS = ("net_arch", "activation_fn", "log_std_init", "ortho_init", "lstm_hidden_size", "enable_critic_lstm")


def sample_npg_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample NPG hyperparameters: the natural-gradient step, rollout and GAE, the critic, the network.

    :param trial: the Optuna trial to sample from
    :param n_actions: dimension of a ``Box`` action space, 0 for other spaces (no ``log_std_init`` then)
    :param n_envs: number of parallel environments (the rollout holds ``n_steps * n_envs`` samples)
    :param additional_args: rl-zoo3's extra sampler arguments, unused
    :return: keyword arguments for :class:`sb3_trpo.NPG`
    """
    _suggest_natural_gradient(trial, n_actions)
    return store_config_entry(trial)


def sample_trpo_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample TRPO hyperparameters: those of :func:`sample_npg_params` (same arguments)
    plus the backtracking line search.

    :return: keyword arguments for :class:`sb3_trpo.TRPO`
    """
    _suggest_natural_gradient(trial, n_actions)
    trial.suggest_float("line_search_shrinking_factor", 0.5, 0.9)
    trial.suggest_int("line_search_max_iter", 5, 20)
    return store_config_entry(trial)


def sample_trpo_mask_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample MaskableTRPO hyperparameters: those of :func:`sample_trpo_params` (same
    arguments; masking adds none).

    :return: keyword arguments for :class:`sb3_trpo.MaskableTRPO`
    """
    return sample_trpo_params(trial, n_actions, n_envs, additional_args)


def sample_trpo_lstm_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample RecurrentTRPO hyperparameters: those of :func:`sample_trpo_params` (same
    arguments) plus the LSTM size and whether the critic has its own LSTM.

    :return: keyword arguments for :class:`sb3_trpo.RecurrentTRPO`
    """
    sample_trpo_params(trial, n_actions, n_envs, additional_args)
    trial.suggest_categorical("lstm_hidden_size", list(LSTM_HIDDEN_SIZES))
    trial.suggest_categorical("enable_critic_lstm", [True, False])
    return store_config_entry(trial)


class TargetKLSchedule(LinearSchedule):
    """SB3's linear schedule, equal to another with the same values (a trial's parameters give back an equal one)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]


def target_kl_schedule(spec: str) -> TargetKLSchedule:
    """
    The ``target_kl`` schedule a config writes as ``lin_<start>``, rl-zoo3's spelling of a linear schedule.

    For ``target_kl`` it shrinks linearly from ``start`` at the beginning of training to
    ``start * TARGET_KL_END_FRACTION`` at the end (rl-zoo3's learning rates go to 0, but a trust
    region of radius 0 would take no step).

    :param spec: ``"lin_<start>"``, e.g. ``"lin_0.02"``
    :raises ValueError: for any other string
    """
    kind, _, start = spec.partition("_")
    try:
        value = float(start)
    except ValueError:
        value = math.nan
    if kind != "lin" or not value > 0:
        raise ValueError(f"target_kl must be a number or 'lin_<start>' with start > 0 (a linear schedule), got {spec!r}")
    return TargetKLSchedule(start=value, end=value * TARGET_KL_END_FRACTION, end_fraction=1.0)


def _suggest_natural_gradient(trial: optuna.Trial, n_actions: int) -> None:
    # The trust region delta, constant or shrinking linearly over training, and the conjugate-gradient solve of F s = g.
    trial.suggest_float("target_kl", 1e-3, 0.1, log=True)
    trial.suggest_categorical("target_kl_schedule", ["constant", "linear"])
    trial.suggest_int("cg_max_steps", 5, 30)
    trial.suggest_float("cg_damping", 1e-3, 0.5, log=True)
    # Rollout of 32 to 2048 steps per environment; gamma in [0.9, 0.9999], lambda in [0.8, 0.999].
    trial.suggest_int("n_steps_pow", 5, 11)
    trial.suggest_float("one_minus_gamma", 1e-4, 0.1, log=True)
    trial.suggest_float("one_minus_gae_lambda", 1e-3, 0.2, log=True)
    # The critic's regression: Adam step size, epochs over the rollout, minibatch of 32 to 1024.
    trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    trial.suggest_int("n_critic_updates", 5, 30)
    trial.suggest_int("batch_size_pow", 5, 10)
    trial.suggest_categorical("net_arch", list(NET_ARCHS))
    trial.suggest_categorical("activation_fn", list(ACTIVATION_FNS))
    trial.suggest_categorical("ortho_init", [True, False])
    if n_actions > 0:
        trial.suggest_float("log_std_init", -3.0, 1.0)


def store_config_entry(trial: optuna.Trial) -> dict[str, Any]:
    """Store the trial's rl-zoo3 config entry as user attributes; return its constructor arguments."""
    for name, value in config_entry(trial.params).items():
        trial.set_user_attr(name, value)
    return convert_params(trial.params)


def _scalar_hyperparams(params: Mapping[str, Any]) -> dict[str, Any]:
    hyperparams: dict[str, Any] = {}
    for name, value in params.items():
        if name in _POWERS_OF_TWO:
            hyperparams[_POWERS_OF_TWO[name]] = 2**value
        elif name in _COMPLEMENTS:
            hyperparams[_COMPLEMENTS[name]] = 1 - value
        elif name not in (*_POLICY_PARAMS, "target_kl_schedule"):
            hyperparams[name] = value
    if params.get("target_kl_schedule") == "linear":
        hyperparams["target_kl"] = f"lin_{params['target_kl']}"
    return hyperparams


def _policy_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    layers = NET_ARCHS[params["net_arch"]]
    policy_kwargs: dict[str, Any] = {
        "net_arch": {"pi": list(layers), "vf": list(layers)},
        "activation_fn": ACTIVATION_FNS[params["activation_fn"]],
        "ortho_init": params["ortho_init"],
    }
    # Optional policy options: the Gaussian's initial log-std, and RecurrentTRPO's LSTM.
    for name in ("log_std_init", "lstm_hidden_size", "enable_critic_lstm"):
        if name in params:
            policy_kwargs[name] = params[name]
    return policy_kwargs


def convert_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """
    Constructor arguments for the sampled parameters of a trial (``trial.params``).

    :param params: parameters as :func:`sample_trpo_params` or :func:`sample_npg_params` sampled them
    :return: keyword arguments for :class:`sb3_trpo.TRPO` (or :class:`sb3_trpo.NPG`)
    """
    hyperparams = _scalar_hyperparams(params)
    if isinstance(hyperparams.get("target_kl"), str):
        hyperparams["target_kl"] = target_kl_schedule(hyperparams["target_kl"])
    return {**hyperparams, "policy_kwargs": _policy_kwargs(params)}


def config_entry(params: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    """
    The rl-zoo3 config entry (YAML-ready values) for the sampled parameters of a trial.

    Registered as rl-zoo3's hyperparameter converter, which ``--trial-id`` uses.

    ``policy_kwargs`` is the string that rl-zoo3 evaluates, e.g.
    ``"dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh, ortho_init=True)"``.

    :param params: parameters as :func:`sample_trpo_params` or :func:`sample_npg_params` sampled them
    :param fixed: entries that were not tuned (``n_envs``, ``n_timesteps``, ``policy``, ``normalize``, ...);
        they come first in the entry
    :return: the config entry, keys in the order the hyperparameters were sampled
    """
    policy_kwargs = ", ".join(f"{name}={_python_source(value)}" for name, value in _policy_kwargs(params).items())
    return {**fixed, **_scalar_hyperparams(params), "policy_kwargs": f"dict({policy_kwargs})"}


def entry_params(
    sampler: Sampler,
    hyperparams: Mapping[str, Any],
    algorithm_class: type,
    n_actions: int,
) -> dict[str, Any]:
    """
    The sampled parameters that stand for a config entry: the inverse of :func:`convert_params`,
    for ``study.enqueue_trial``, so that a study's first trial is the entry it starts from.

    Parameters the entry does not set take the constructor's defaults (SB3's MLP of two
    64-unit layers when ``net_arch`` is not given).

    :param sampler: the sampler of the study (it names the parameters and their ranges)
    :param hyperparams: the entry as rl-zoo3 preprocessed it (``policy_kwargs`` a dict)
    :param algorithm_class: the class the entry configures, for the defaults
    :param n_actions: as for the sampler (0: no ``log_std_init``)
    :return: ``trial.params`` of a trial that trains with the entry
    :raises ValueError: naming the hyperparameter whose value the search space does not hold
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        probe = optuna.create_study().ask()
    finally:
        optuna.logging.set_verbosity(verbosity)
    sampler(probe, n_actions, 1, {})
    defaults = _defaults(algorithm_class)
    policy = hyperparams.get("policy", "MlpPolicy")
    policy_class = algorithm_class.policy_aliases[policy] if isinstance(policy, str) else policy  # type: ignore[attr-defined]
    policy_defaults = _defaults(policy_class)
    entry_policy_kwargs = dict(hyperparams.get("policy_kwargs") or {})
    policy_kwargs = {**policy_defaults, **entry_policy_kwargs}
    # A trial's policy_kwargs replace the entry's: what the sampler does not set would be lost.
    unsampled = sorted(set(entry_policy_kwargs) - set(probe.distributions))
    if unsampled:
        raise ValueError(
            f"policy_kwargs {', '.join(unsampled)} in the config entry are not in the search space of the "
            f"study (it samples {', '.join(name for name in _POLICY_PARAMS if name in probe.distributions)})"
        )
    params: dict[str, Any] = {}
    for name, distribution in probe.distributions.items():
        if name in _POWERS_OF_TWO:
            value: Any = math.log2(_entry_value(_POWERS_OF_TWO[name], hyperparams, defaults))
        elif name in _COMPLEMENTS:
            # Rounded, so that 1 - 0.99 is stored as 0.01 and gives back 0.99.
            value = float(f"{1 - _entry_value(_COMPLEMENTS[name], hyperparams, defaults):.12g}")
        elif name == "net_arch":
            value = _net_arch_name(policy_kwargs["net_arch"])
        elif name == "activation_fn":
            value = next((key for key, module in ACTIVATION_FNS.items() if module is policy_kwargs[name]), None)
        elif name in _POLICY_PARAMS:
            value = policy_kwargs[name]
        elif name in ("target_kl", "target_kl_schedule"):
            value = _target_kl_param(name, hyperparams.get("target_kl", defaults["target_kl"]))
        else:
            value = _entry_value(name, hyperparams, defaults)
        if not _holds(distribution, value):
            raise ValueError(
                f"{_entry_shown(name, hyperparams, policy_kwargs)} in the config entry is outside the "
                f"search space of the study: {_range(name, distribution)}"
            )
        params[name] = int(value) if isinstance(distribution, optuna.distributions.IntDistribution) else value
    return params


def _holds(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Whether the search space of one sampled parameter holds ``value``."""
    import optuna

    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return any(value == choice and type(value) is type(choice) for choice in distribution.choices)
    assert isinstance(distribution, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not distribution.low <= value <= distribution.high:
        return False
    return not isinstance(distribution, optuna.distributions.IntDistribution) or float(value).is_integer()


def _defaults(cls: type) -> dict[str, Any]:
    """The constructor's keyword defaults."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _entry_value(name: str, hyperparams: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    value = hyperparams.get(name, defaults.get(name))
    if callable(value):
        # rl-zoo3 turns constants into constant schedules too.
        start, end = value(1.0), value(0.0)
        if start != end:
            raise ValueError(f"{name} of the config entry is a schedule ({start} to {end}); a study samples constants")
        value = start
    return value


def _target_kl_param(name: str, target_kl: Any) -> Any:
    """The sampled ``target_kl`` (its start) or ``target_kl_schedule`` that stand for the entry's ``target_kl``."""
    start, end = (target_kl(1.0), target_kl(0.0)) if callable(target_kl) else (target_kl, target_kl)
    if end != start and not math.isclose(end, start * TARGET_KL_END_FRACTION):
        raise ValueError(
            f"target_kl of the config entry is a schedule ({start} to {end}); a study samples constants "
            f"and linear schedules to {TARGET_KL_END_FRACTION} of their start ('lin_<start>')"
        )
    if name == "target_kl":
        return start
    return "constant" if end == start else "linear"


def _net_arch_name(net_arch: Any) -> str | None:
    if net_arch is None:
        return "small"  # SB3's MLP default, two 64-unit layers for actor and critic
    if isinstance(net_arch, dict):
        layers = list(net_arch.get("pi", []))
        if layers != list(net_arch.get("vf", [])):
            return None
    else:
        layers = list(net_arch)
    return next((key for key, value in NET_ARCHS.items() if value == layers), None)


def _entry_shown(name: str, hyperparams: Mapping[str, Any], policy_kwargs: Mapping[str, Any]) -> str:
    shown = {**_POWERS_OF_TWO, **_COMPLEMENTS}.get(name, name)
    source = policy_kwargs if name in _POLICY_PARAMS else hyperparams
    value = source.get(shown, "its default")
    return f"{shown}={getattr(value, '__name__', value)}"


def _range(name: str, distribution: Any) -> str:
    """The search space of a sampled parameter, in terms of the config entry's hyperparameter."""
    if hasattr(distribution, "choices"):
        return "one of " + ", ".join(map(str, distribution.choices))
    if name in _POWERS_OF_TWO:
        return f"powers of two from {2**distribution.low} to {2**distribution.high}"
    if name in _COMPLEMENTS:
        return f"[{1 - distribution.high:.12g}, {1 - distribution.low:.12g}]"
    return f"[{distribution.low}, {distribution.high}]"


def _python_source(value: Any) -> str:
    """Source text that rl-zoo3's ``eval`` of ``policy_kwargs`` (with ``nn`` in scope) turns back into ``value``."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{key}={_python_source(item)}" for key, item in value.items()) + ")"
    if isinstance(value, type) and issubclass(value, nn.Module):
        return f"nn.{value.__name__}"
    return repr(value)


def check_env_id(env_id: str) -> None:
    """Raise a ``ValueError`` naming ``env_id`` and the closest registered ids unless Gymnasium knows it."""
    import gymnasium as gym

    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown environment id {env_id!r}{hint}")


def check_storage(url: str | None) -> None:
    """
    Raise a ``ValueError`` naming the problem unless ``url`` is a storage Optuna can open.

    Connects once and disconnects without writing, so that bad input stops a run before
    any training and leaves an existing study as it was. ``None`` (in-memory) and
    rl-zoo3's journal files (``*.log``) need no check.

    :param url: SQLAlchemy URL of the Optuna RDB storage, e.g. ``sqlite:///study.db``
        or ``postgresql://user:password@host/database``
    """
    if url is None or url.endswith(".log"):
        return
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = sqlalchemy.make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"malformed storage URL {url!r} ({error}); expected e.g. sqlite:///study.db or postgresql://user@host/db"
        ) from error
    shown = parsed.render_as_string(hide_password=True)
    # A black-holed host would otherwise wait for the operating system's TCP timeout.
    connect_args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": 10}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
    except NoSuchModuleError as error:
        raise ValueError(f"storage URL {shown!r} names an unknown database {parsed.drivername!r}") from error
    except ArgumentError as error:
        raise ValueError(f"malformed storage URL {shown!r}: {error}") from error
    except ImportError as error:
        raise ValueError(f"storage URL {shown!r} needs a database driver that is not installed: {error}") from error
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip()
        raise ValueError(f"cannot reach storage {shown!r}: {reason}") from error
    finally:
        engine.dispose()


# ------------------------------------------------------- storages shared by many workers

# Seconds between the heartbeats of a running trial, and without one before it counts as dead.
DEFAULT_HEARTBEAT_INTERVAL = 60
DEFAULT_GRACE_PERIOD = 180
# A trial whose worker died or was stopped is run again at most this many times: a trial
# that kills its worker every time (out of memory, say) must not take the study with it.
DEFAULT_MAX_RETRY = 3
# pg_advisory_lock's key (any 64-bit integer; these are the bytes of "sb3_trpo").
_POSTGRESQL_LOCK_KEY = 0x7362335F7472706F
_LOCK_TIMEOUT = 600


@contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """
    Hold, across processes and machines, a lock on the storage ``url`` of an Optuna study.

    Workers started together on an empty storage would otherwise race to create Optuna's
    tables, or each enqueue the same trial. PostgreSQL: an advisory lock; MySQL and
    MariaDB: ``GET_LOCK``; both are released by the server when a holder dies. SQLite
    and rl-zoo3's journal files (``*.log``): a lock file beside the database file
    (Optuna's, broken when it has not changed for 30 s). In-memory SQLite and other
    databases: no lock.

    :param url: SQLAlchemy URL of an Optuna RDB storage, or the path of a journal file
    """
    if url.endswith(".log"):
        path: str | None = url
    else:
        import sqlalchemy

        parsed = sqlalchemy.make_url(url)
        backend = parsed.get_backend_name()
        if backend in ("postgresql", "mysql", "mariadb"):
            with _database_lock(parsed, backend):
                yield
            return
        path = parsed.database if backend == "sqlite" and parsed.database not in (None, "", ":memory:") else None
    if path is None:
        yield
        return
    from optuna.storages.journal import JournalFileOpenLock

    # Not the journal's own lock file (path + ".lock"): its writes happen inside this lock.
    lock = JournalFileOpenLock(f"{path}.setup")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _database_lock(url: Any, backend: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if backend == "postgresql":
                key: dict[str, Any] = {"key": _POSTGRESQL_LOCK_KEY}
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
                unlock = "SELECT pg_advisory_unlock(:key)"
            else:
                key = {"key": f"sb3_trpo:{url.database}"}
                acquire = sqlalchemy.text("SELECT GET_LOCK(:key, :timeout)")
                if connection.execute(acquire, {**key, "timeout": _LOCK_TIMEOUT}).scalar() != 1:
                    raise TimeoutError(f"storage lock {key['key']!r} not acquired in {_LOCK_TIMEOUT} s")
                unlock = "SELECT RELEASE_LOCK(:key)"
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(unlock), key)
                connection.commit()
    finally:
        engine.dispose()


def check_fault_options(heartbeat_interval: int, grace_period: int, max_retry: int, as_options: bool = False) -> None:
    """
    Raise a ``ValueError`` naming the parameter and its range unless the arguments of
    :func:`open_storage` and :class:`SignalStop` are usable.

    :param heartbeat_interval: must be positive
    :param grace_period: must exceed ``heartbeat_interval``
    :param max_retry: an integer >= 0
    :param as_options: name the parameters as the command-line options (``--max-retry``)
    """

    def name(parameter: str) -> str:
        return "--" + parameter.replace("_", "-") if as_options else parameter

    if not 0 < heartbeat_interval < grace_period:
        raise ValueError(
            f"{name('grace_period')} ({grace_period}) must exceed {name('heartbeat_interval')} ({heartbeat_interval}), "
            "and both be positive: a trial that records a heartbeat in time must never count as dead"
        )
    if isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 0:
        raise ValueError(
            f"{name('max_retry')} must be an integer >= 0 (the times a trial whose worker died or was stopped "
            f"is run again; 0: never), got {max_retry!r}"
        )


def open_storage(
    url: str,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    max_retry: int = DEFAULT_MAX_RETRY,
) -> optuna.storages.BaseStorage:
    """
    Open the storage of a study that several workers share; safe when they start together.

    An RDB storage (SQLite, PostgreSQL, MySQL) is opened with Optuna's heartbeat: a running
    trial records a heartbeat every ``heartbeat_interval`` seconds; when a worker starts a
    trial, the trials of the study without a heartbeat for ``grace_period`` seconds (their
    worker died) become FAIL and are enqueued again with the same parameters, up to
    ``max_retry`` times. A path ending in ``.log`` is opened as rl-zoo3 does, an
    Optuna journal file, which has no heartbeat.

    :param url: SQLAlchemy URL of the RDB storage, or the path of a journal file
    :param heartbeat_interval: seconds between heartbeats of a running trial
    :param grace_period: seconds without a heartbeat after which a running trial is failed
    :param max_retry: how many times a trial of a dead worker is run again (0: never)
    :return: the storage, for ``optuna.create_study(storage=...)``
    :raises ValueError: for the values :func:`check_fault_options` refuses
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    check_fault_options(heartbeat_interval, grace_period, max_retry)
    with storage_lock(url):
        if url.endswith(".log"):
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(url))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )


def enqueue_unless_measured(study: optuna.Study, params: dict[str, Any]) -> bool:
    """
    Enqueue a trial of ``params`` unless one is COMPLETE, PRUNED, RUNNING or WAITING.

    A FAIL trial does not count: it measured nothing. Call it inside :func:`storage_lock`
    when workers may enqueue the same parameters at the same time.

    :return: whether the trial was enqueued
    """
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    # An enqueued trial keeps its parameters in "fixed_params" until it runs.
    if any(trial.system_attrs.get("fixed_params", trial.params) == params for trial in study.get_trials(states=states)):
        return False
    study.enqueue_trial(params)
    return True


# ------------------------------------------------------- workers stopped by a signal

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
        import optuna

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
