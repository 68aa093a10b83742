"""Small policies and dense linear algebra shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor

from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.trust_region import unflatten

T = TypeVar("T")

OBSERVATION_SPACE = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)

ACTION_SPACES = {
    "gaussian": (spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), False),
    "gsde": (spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), True),
    "categorical": (spaces.Discrete(4), False),
    "multicategorical": (spaces.MultiDiscrete([3, 2]), False),
    "bernoulli": (spaces.MultiBinary(3), False),
}


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


def observations(n: int = 7, seed: int = 1) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    return 2 * th.rand(n, 3, generator=generator, dtype=th.float64) - 1


def dense_actor_hessian(policy: th.nn.Module, actor: list[th.nn.Parameter], scalar: Callable[[], th.Tensor]) -> th.Tensor:
    """Explicit Hessian of ``scalar()`` over the ``actor`` parameters of ``policy``, at their current values."""
    names = [name for name, p in policy.named_parameters() if any(p is a for a in actor)]
    flat = th.cat([p.detach().reshape(-1) for p in actor])

    def of_vector(vector: th.Tensor) -> th.Tensor:
        values = dict(zip(names, unflatten(vector, actor), strict=True))
        with th.nn.utils.stateless._reparametrize_module(policy, values):
            return scalar()

    return th.autograd.functional.hessian(of_vector, flat)


def dense_kl_hessian(policy: ActorCriticPolicy, obs: th.Tensor) -> th.Tensor:
    """Explicit Hessian of the mean KL(pi_old || pi) over the actor parameters, at pi = pi_old."""
    actor, _ = split_actor_critic(policy)
    with th.no_grad():
        old = copy.copy(policy.get_distribution(obs))
    return dense_actor_hessian(policy, actor, lambda: kl_divergence(old, policy.get_distribution(obs)).mean())
