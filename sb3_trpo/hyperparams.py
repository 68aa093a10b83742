"""Optuna search spaces for NPG, TRPO and ACKTR, and the way back from a trial to a config entry.

The samplers have rl-zoo3's signature ``(trial, n_actions, n_envs, additional_args) -> dict``
and return constructor arguments. Every trial also carries, as user attributes, the
rl-zoo3 config entry its parameters stand for, so the best trial of a study is a config.
Running a study with many workers (shared storage, signals) is :mod:`sb3_trpo.tuning`'s job.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

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
    :param n_envs: number of parallel environments (the rollout holds ``n_steps * n_envs`` samples);
        unused: ``batch_size`` is at most ``n_steps``, so the config is valid for any ``n_envs``
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


def sample_acktr_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample ACKTR hyperparameters: the K-FAC trust region, rollout and GAE, the K-FAC critic, the network.

    Same arguments as :func:`sample_npg_params`.

    :return: keyword arguments for :class:`sb3_trpo.ACKTR`
    """
    # The model-KL radius (K-FAC's block-diagonal Fisher underestimates the KL: below TRPO's range) and the cap.
    trial.suggest_float("target_kl", 1e-4, 0.02, log=True)
    trial.suggest_categorical("target_kl_schedule", ["constant", "linear"])
    trial.suggest_float("max_lr", 0.05, 2.0, log=True)
    trial.suggest_float("kfac_damping", 1e-4, 0.1, log=True)
    trial.suggest_categorical("kfac_decay", [0.0, 0.5, 0.9])
    trial.suggest_int("n_steps_pow", 6, 11)
    trial.suggest_float("one_minus_gamma", 1e-4, 0.1, log=True)
    trial.suggest_float("one_minus_gae_lambda", 1e-3, 0.2, log=True)
    # The critic: fraction of the Gauss-Newton step, its KL bound, epochs, minibatch (at most n_steps).
    trial.suggest_float("learning_rate", 0.05, 1.0, log=True)
    trial.suggest_float("critic_target_kl", 0.01, 10.0, log=True)
    trial.suggest_int("n_critic_updates", 1, 20)
    trial.suggest_int("batch_size_pow", 6, 11)
    _suggest_policy(trial, n_actions)
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


def _suggest_policy(trial: optuna.Trial, n_actions: int) -> None:
    # The networks' shape and activation, orthogonal initialization, and a Gaussian's initial log std.
    trial.suggest_categorical("net_arch", list(NET_ARCHS))
    trial.suggest_categorical("activation_fn", list(ACTIVATION_FNS))
    trial.suggest_categorical("ortho_init", [True, False])
    if n_actions > 0:
        trial.suggest_float("log_std_init", -3.0, 1.0)


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
    # The critic's regression: Adam step size, epochs over the rollout, minibatch of 32 to 1024 (at most n_steps).
    trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    trial.suggest_int("n_critic_updates", 5, 30)
    trial.suggest_int("batch_size_pow", 5, 10)
    _suggest_policy(trial, n_actions)


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
    # SB3 needs batch_size <= n_steps * n_envs. Capped at one environment's rollout (the rule of
    # rl-zoo3's early samplers), the entry of a trial is valid for any n_envs, and --trial-id's
    # conversion of trial.params, which does not know n_envs, gives what the trial trained with.
    if "batch_size" in hyperparams and "n_steps" in hyperparams:
        hyperparams["batch_size"] = min(hyperparams["batch_size"], hyperparams["n_steps"])
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
    # Imported here: optuna comes with the zoo extra, and target_kl_schedule must import without it.
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
    # The study caps batch_size at n_steps (_scalar_hyperparams): a trial of a larger one would train with less.
    if params.get("batch_size_pow", -math.inf) > params.get("n_steps_pow", math.inf):
        raise ValueError(
            f"{_entry_shown('batch_size_pow', hyperparams, policy_kwargs)} in the config entry is outside the "
            f"search space of the study: at most n_steps ({2 ** params['n_steps_pow']}), whatever n_envs"
        )
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
