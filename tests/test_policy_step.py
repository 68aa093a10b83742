"""The step's current and old distributions: one forward pass where it provably gives the no-grad pass's bits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from sb3_trpo.common.distributions import distribution_parameters
from sb3_trpo.common.policy_step import PolicyBatch, current_and_old


class DropoutExtractor(FlattenExtractor):
    """Features that draw random numbers in training mode: each forward pass draws anew."""

    def __init__(self, observation_space: spaces.Box):
        super().__init__(observation_space)
        self.dropout = nn.Dropout(0.5)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.dropout(super().forward(observations))


BOX = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
CASES: dict[str, tuple[spaces.Space, dict[str, Any], int]] = {
    "gaussian-mlp": (BOX, {}, 1),
    "categorical": (spaces.Discrete(4), {}, 2),
    "gaussian-gsde": (BOX, {"use_sde": True}, 2),
    "gaussian-dropout": (BOX, {"features_extractor_class": DropoutExtractor}, 2),
}


def _counted(policy: ActorCriticPolicy) -> tuple[Callable[[PolicyBatch], Distribution], list[int]]:
    calls = [0]

    def distribution(batch: PolicyBatch) -> Distribution:
        calls[0] += 1
        return policy.get_distribution(batch.observations)

    return distribution, calls


@pytest.mark.parametrize("name", list(CASES))
def test_old_distribution_holds_the_no_grad_forward_bits(name: str) -> None:
    action_space, options, expected_passes = CASES[name]
    observation_space = spaces.Box(-np.inf, np.inf, (5,), dtype=np.float64)
    th.manual_seed(0)
    policy = ActorCriticPolicy(observation_space, action_space, lambda _: 1e-3, **options)
    policy.set_training_mode(True)
    observations = th.as_tensor(np.random.default_rng(0).normal(size=(64, 5)) * 10.0)
    batch = PolicyBatch(observations=observations, actions=th.zeros(64), old_log_prob=th.zeros(64), advantages=th.zeros(64))

    th.manual_seed(1)
    with th.no_grad():
        reference = [p.clone() for p in distribution_parameters(policy.get_distribution(observations)) or ()]
    th.manual_seed(1)
    distribution, calls = _counted(policy)
    current, old = current_and_old(distribution, batch, policy)

    assert calls[0] == expected_passes
    assert current is not old
    current_parameters, old_parameters = distribution_parameters(current), distribution_parameters(old)
    assert current_parameters is not None and old_parameters is not None
    assert all(p.grad_fn is None and not p.requires_grad for p in old_parameters)
    assert any(p.requires_grad for p in current_parameters)
    if expected_passes == 1:
        for mine, sb3 in zip(old_parameters, reference, strict=True):
            assert th.equal(mine, sb3)
        assert all(th.equal(c, o) for c, o in zip(current_parameters, old_parameters, strict=True))


def test_unknown_policy_takes_two_passes() -> None:
    observation_space = spaces.Box(-np.inf, np.inf, (5,), dtype=np.float64)
    policy = ActorCriticPolicy(observation_space, BOX, lambda _: 1e-3)
    batch = PolicyBatch(observations=th.zeros(4, 5), actions=th.zeros(4), old_log_prob=th.zeros(4), advantages=th.zeros(4))
    distribution, calls = _counted(policy)
    current_and_old(distribution, batch, None)
    assert calls[0] == 2
