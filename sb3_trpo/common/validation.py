"""Construction-time checks of hyperparameters, and the error raised for non-finite data."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer


class NonFiniteError(ValueError):
    """Raised when NaN or infinite values would reach the weights; the weights are left as they were."""


FISHER_VECTOR_PRODUCTS = ("analytic", "double_backprop")


def positive_or_positive_schedule(value: Any) -> bool:
    """Whether ``value`` is > 0, or a schedule of the remaining progress that is > 0 at progress 1 and 0."""
    if callable(value):
        return all(math.isfinite(value(progress)) and value(progress) > 0 for progress in (1.0, 0.0))
    return value > 0


# Each hyperparameter's rule: the test a value must pass, and the allowed range as the error states it.
HYPERPARAMETER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "target_kl": (positive_or_positive_schedule, "> 0 (or a schedule that is > 0 at progress 1 and 0)"),
    "cg_max_steps": (lambda value: value >= 1, ">= 1"),
    "cg_damping": (lambda value: value >= 0, ">= 0"),
    "cg_residual_tol": (lambda value: value >= 0, ">= 0"),
    "sub_sampling_factor": (lambda value: value >= 1, ">= 1"),
    "n_critic_updates": (lambda value: value >= 0, ">= 0"),
    "batch_size": (lambda value: value >= 1, ">= 1"),
    "gamma": (lambda value: 0 < value <= 1, "in (0, 1]"),
    "gae_lambda": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "n_steps": (lambda value: value >= 1, ">= 1"),
    "learning_rate": (lambda value: callable(value) or value > 0, "> 0 (or a schedule)"),
    "line_search_shrinking_factor": (lambda value: 0 < value < 1, "in (0, 1)"),
    "line_search_max_iter": (lambda value: value >= 1, ">= 1"),
    "fisher_vector_product": (lambda value: value in FISHER_VECTOR_PRODUCTS, f"one of {FISHER_VECTOR_PRODUCTS}"),
}


def check_hyperparameter(name: str, value: Any, valid: bool, allowed: str) -> None:
    """Raise a ``ValueError`` naming ``name`` and its allowed range unless ``valid``."""
    if not valid:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_hyperparameters(values: Mapping[str, Any]) -> None:
    """Check each value against its rule in :data:`HYPERPARAMETER_RULES` (see :func:`check_hyperparameter`)."""
    for name, value in values.items():
        rule, allowed = HYPERPARAMETER_RULES[name]
        check_hyperparameter(name, value, rule(value), allowed)


def check_action_space(algorithm: str, action_space: spaces.Space, supported: tuple[type[spaces.Space], ...]) -> None:
    """Raise a ``ValueError`` naming the action space and the supported ones unless it is one of them."""
    if not isinstance(action_space, supported):
        names = ", ".join(space.__name__ for space in supported)
        raise ValueError(
            f"action space {type(action_space).__name__} is not supported by {algorithm}; supported action spaces: {names}"
        )


def warn_truncated_batch(batch_size: int, n_steps: int, n_envs: int) -> None:
    """Warn, in sb3-contrib's words, when the rollout is not a whole number of critic mini-batches."""
    buffer_size = n_steps * n_envs
    if buffer_size % batch_size > 0:
        warnings.warn(
            f"You have specified a mini-batch size of {batch_size},"
            f" but because the `RolloutBuffer` is of size `n_steps * n_envs = {buffer_size}`,"
            f" after every {buffer_size // batch_size} untruncated mini-batches,"
            f" there will be a truncated mini-batch of size {buffer_size % batch_size}\n"
            f"We recommend using a `batch_size` that is a factor of `n_steps * n_envs`.\n"
            f"Info: (n_steps={n_steps} and n_envs={n_envs})",
            stacklevel=3,
        )


def check_finite(what: str, arrays: list[np.ndarray], update: int) -> None:
    """Raise :class:`NonFiniteError` if a floating-point array holds NaN or infinity."""
    for array in arrays:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise NonFiniteError(f"non-finite {what} in the rollout of update {update}; the weights were not changed")


def check_rollout_finite(buffer: RolloutBuffer, update: int) -> None:
    """Raise :class:`NonFiniteError` if the rollout's observations, rewards, values, advantages or returns are not finite."""
    check_finite("observations", observation_arrays(buffer.observations), update)
    for what in ("rewards", "values", "advantages", "returns"):
        check_finite(what, [getattr(buffer, what)], update)


def observation_arrays(observations: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays of a flat or a dict observation."""
    return list(observations.values()) if isinstance(observations, dict) else [observations]
