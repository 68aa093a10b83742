"""Small policies, models and settings shared by the tests, references independent of the package (dense algebra,
KL), what a run logs and does update by update, and process checks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from sb3_trpo import NPG, RecurrentTRPO
from sb3_trpo.common.policy_step import PolicyBatch, PolicyStepStats
from sb3_trpo.common.trust_region import flatten, unflatten
from sb3_trpo.trpo_mask.trpo_mask import MaskablePolicyBatch
from sb3_trpo.trpo_recurrent.trpo_recurrent import RecurrentPolicyBatch

REPO = Path(__file__).resolve().parent.parent  # the checkout
T = TypeVar("T")
Model = TypeVar("Model", bound=NPG)

# Settings of a model that trains in a fraction of a second per update.
SMALL: dict[str, Any] = dict(n_steps=64, batch_size=32, n_critic_updates=2, seed=0, policy_kwargs=dict(net_arch=[16]))

OBSERVATION_SPACE = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)

ACTION_SPACES = {
    "gaussian": (spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), False),
    "gsde": (spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), True),
    "categorical": (spaces.Discrete(4), False),
    "multicategorical": (spaces.MultiDiscrete([3, 2]), False),
    "bernoulli": (spaces.MultiBinary(3), False),
}


class Reach(gym.Env):
    """Continuous actions in two dimensions: the reward is minus the squared distance of the action to the observation."""

    observation_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        self.target = self.observation_space.sample()
        return self.target, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = -float(np.sum((np.clip(action, -1.0, 1.0) - self.target) ** 2))
        self.t += 1
        self.target = self.observation_space.sample()
        return self.target, reward, False, self.t >= 20, {}


def actor_vector(model: NPG) -> th.Tensor:
    """A copy of the actor's parameters as one flat vector on the CPU."""
    return parameter_vector(model.actor_parameters)


def critic_vector(model: NPG) -> th.Tensor:
    """A copy of the critic's parameters as one flat vector on the CPU."""
    return parameter_vector(model.critic_parameters)


def parameter_vector(parameters: Iterable[th.Tensor]) -> th.Tensor:
    """A copy of ``parameters`` as one flat vector on the CPU (concatenation copies)."""
    return flatten([p.detach().cpu() for p in parameters])


def all_finite(model: NPG) -> bool:
    return all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


class DoubleFlatten(FlattenExtractor):
    """SB3 preprocesses Box observations to float32; the dense checks run in float64."""

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return super().forward(observations).double()


class DoubleLinearExtractor(DoubleFlatten):
    """A features extractor with parameters, to be shared by actor and critic."""

    def __init__(self, observation_space: spaces.Box):
        super().__init__(observation_space)
        self.linear = th.nn.Linear(self.features_dim, self.features_dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.tanh(self.linear(super().forward(observations)))


def small_policy(kind: str, seed: int = 0, shared_extractor: bool = False) -> ActorCriticPolicy:
    """A tiny policy (double precision) whose action distribution is of the given kind."""
    th.manual_seed(seed)
    action_space, use_sde = ACTION_SPACES[kind]
    policy = ActorCriticPolicy(
        OBSERVATION_SPACE,
        action_space,
        lambda _: 1e-3,
        net_arch=[5],
        use_sde=use_sde,
        log_std_init=-0.3,
        features_extractor_class=DoubleLinearExtractor if shared_extractor else DoubleFlatten,
        share_features_extractor=shared_extractor,
    ).double()
    # Spread the log-std so that the Gaussian Fisher is not a multiple of the identity.
    if hasattr(policy, "log_std"):
        with th.no_grad():
            policy.log_std.add_(0.1 * th.randn_like(policy.log_std))
    return policy


def in_float64(build: Callable[[], T]) -> T:
    """Build a model with float64 parameters (the dense checks run in double precision)."""
    default = th.get_default_dtype()
    th.set_default_dtype(th.float64)
    try:
        return build()
    finally:
        th.set_default_dtype(default)


def tiny_double_model(algorithm: type[Model], env: gym.Env, fisher_vector_product: str = "analytic") -> Model:
    """A model of ``algorithm`` with a few-unit policy (an LSTM one for RecurrentTRPO) that computes in float64."""
    if issubclass(algorithm, RecurrentTRPO):
        policy, network = "MlpLstmPolicy", dict(lstm_hidden_size=3, net_arch=[3])
    else:
        policy, network = "MlpPolicy", dict(net_arch=[4])
    policy_kwargs = dict(features_extractor_class=DoubleFlatten, **network)
    return in_float64(
        lambda: algorithm(
            policy, env, n_steps=8, fisher_vector_product=fisher_vector_product, policy_kwargs=policy_kwargs, seed=0
        )
    )


def observations(n: int = 7, seed: int = 1) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    return 2 * th.rand(n, 3, generator=generator, dtype=th.float64) - 1


def dense_hessian(policy: nn.Module, parameters: list[nn.Parameter], scalar: Callable[[], th.Tensor]) -> th.Tensor:
    """Explicit Hessian of ``scalar()`` (computed by ``policy``) over ``parameters``, at their current values."""
    names = [name for name, p in policy.named_parameters() if any(p is q for q in parameters)]
    flat = th.cat([p.detach().reshape(-1) for p in parameters])

    class Scalar(nn.Module):
        """``scalar()`` as a module's forward, so that ``functional_call`` can swap the policy's parameters under it."""

        def __init__(self) -> None:
            super().__init__()
            self.policy = policy

        def forward(self) -> th.Tensor:
            return scalar()

    def of_vector(vector: th.Tensor) -> th.Tensor:
        values = {f"policy.{name}": value for name, value in zip(names, unflatten(vector, parameters), strict=True)}
        # Untied: where actor and critic share the features extractor, one module sits under several names, and
        # functional_call's weight tying would restore it to the swapped-in tensors.
        return th.func.functional_call(Scalar(), values, (), tie_weights=False)

    return th.autograd.functional.hessian(of_vector, flat)


# ---------------------------------------------------------------- KL by torch.distributions, update by update


def policy_distribution(model: NPG, batch: PolicyBatch) -> Distribution:
    """The model's policy on ``batch``, called through the policy's own API (masks, LSTM states)."""
    if isinstance(batch, MaskablePolicyBatch):
        return model.policy.get_distribution(batch.observations, action_masks=batch.action_masks)  # type: ignore[call-arg]
    if isinstance(batch, RecurrentPolicyBatch):
        distribution, _ = model.policy.get_distribution(batch.observations, batch.lstm_states, batch.episode_starts)  # type: ignore[call-arg]
        return distribution
    return model.policy.get_distribution(batch.observations)


def torch_distributions(distribution: Distribution) -> list[th.distributions.Distribution]:
    """The torch distributions inside an SB3 or sb3-contrib distribution (one per sub-space of a multi-categorical)."""
    inner = getattr(distribution, "distributions", None) or distribution.distribution
    return list(inner) if isinstance(inner, list) else [inner]


def per_sample_kl(p: list[th.distributions.Distribution], q: list[th.distributions.Distribution]) -> th.Tensor:
    """``KL(p || q)`` per sample by ``torch.distributions.kl_divergence``, weighted as the package constrains it.

    A Gaussian's or a Bernoulli's KL is averaged over its action dimensions (as SB3's
    ``kl_divergence(...).mean()`` weighs it); the KLs of the categoricals of a multi-categorical are summed.
    """
    total = th.zeros(())
    for p_part, q_part in zip(p, q, strict=True):
        kl = th.distributions.kl_divergence(p_part, q_part)
        if isinstance(p_part, th.distributions.Normal | th.distributions.Bernoulli):
            kl = kl.mean(dim=-1)
        total = total + kl
    return total


def mean_kl(
    p: list[th.distributions.Distribution], q: list[th.distributions.Distribution], rows: th.Tensor | None
) -> th.Tensor:
    """``KL(p || q)`` averaged over the samples ``rows`` selects (all when None)."""
    per_sample = per_sample_kl(p, q)
    return per_sample.mean() if rows is None else per_sample[rows].mean()


@dataclass(frozen=True, kw_only=True)
class RecordedUpdate:
    """One update of a ``learn()`` run, measured from outside the package.

    :param batch: the batch it was computed on
    :param stats: what the package reports for it (and logs)
    :param kl: ``KL(pi_new || pi_old)`` on the update's batch, by ``torch.distributions``
    :param target_kl: the radius the update ran with
    :param step: the change of the actor's parameters
    :param fisher: the dense Hessian of the batch's mean KL at the old policy (when asked for)
    """

    batch: PolicyBatch
    stats: PolicyStepStats
    kl: float
    target_kl: float
    step: th.Tensor
    fisher: th.Tensor | None


def record_updates(model: NPG, dense_fisher: bool = False) -> list[RecordedUpdate]:
    """Measure every policy update of ``model`` from now on (the list fills as it trains)."""
    updates: list[RecordedUpdate] = []
    policy_step = model._policy_step

    def recorded(batch: PolicyBatch, update: int) -> PolicyStepStats:
        with th.no_grad():
            old = torch_distributions(policy_distribution(model, batch))
        fisher = None
        if dense_fisher:
            fisher = dense_hessian(
                model.policy,
                model.actor_parameters,
                lambda: mean_kl(old, torch_distributions(policy_distribution(model, batch)), batch.mask),
            )
        before = actor_vector(model)
        stats = policy_step(batch, update)
        with th.no_grad():
            new = torch_distributions(policy_distribution(model, batch))
        updates.append(
            RecordedUpdate(
                batch=batch,
                stats=stats,
                kl=float(mean_kl(new, old, batch.mask)),
                target_kl=model.current_target_kl(),
                step=actor_vector(model) - before,
                fisher=fisher,
            )
        )
        return stats

    model._policy_step = recorded  # type: ignore[method-assign]
    return updates


class RecordingLogger(Logger):
    """A logger that writes nowhere and keeps what the model logs: every recorded value, and each update's values."""

    def __init__(self) -> None:
        super().__init__(folder=None, output_formats=[])
        self.recorded: list[tuple[str, Any]] = []
        self.dumped: list[dict[str, Any]] = []

    def record(self, key: str, value: Any, exclude: str | tuple[str, ...] | None = None) -> None:
        self.recorded.append((key, value))
        super().record(key, value, exclude)

    def dump(self, step: int = 0) -> None:
        if any(key.startswith("train/") for key in self.name_to_value):
            self.dumped.append(dict(self.name_to_value))
        super().dump(step)

    @property
    def latest(self) -> dict[str, Any]:
        """The values of the latest update, not yet dumped (SB3 dumps them at the start of the next iteration)."""
        return self.name_to_value

    @property
    def updates(self) -> list[dict[str, Any]]:
        """Each update's values, in order: those dumped, then the last update's, which ``learn()`` never dumps."""
        pending = [dict(self.latest)] if any(key.startswith("train/") for key in self.latest) else []
        return [*self.dumped, *pending]

    def values(self, key: str) -> list[Any]:
        """Every value recorded under ``key``, in order (two in one update included)."""
        return [value for recorded_key, value in self.recorded if recorded_key == key]


def recording_logger(model: BaseAlgorithm) -> RecordingLogger:
    """Give ``model`` a :class:`RecordingLogger` and return it."""
    logger = RecordingLogger()
    model.set_logger(logger)
    return logger


def learn_recording(
    model: Model, total_timesteps: int, dense_fisher: bool = False
) -> tuple[list[RecordedUpdate], list[dict[str, Any]]]:
    """Train ``model``: each policy update measured from outside the package (:func:`record_updates`), and each
    update's logged values (:attr:`RecordingLogger.updates`)."""
    updates = record_updates(model, dense_fisher)
    logger = recording_logger(model)
    model.learn(total_timesteps)
    return updates, logger.updates


def exited(pid: int, timeout: float = 30.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
