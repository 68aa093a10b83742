"""The critic fit computes, minibatch by minibatch, SB3's regression of ``predict_values`` on the returns, to the bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch.nn import functional as F

from sb3_trpo.common.critic import CriticJob, fit_critic, index_observations, prefer_fused_adam
from sb3_trpo.common.policies import split_actor_critic


class ReadsFloat64Values(ActorCriticPolicy):
    """A user's critic that reads the observations' float64 digits: the fit must hand it what the buffer holds."""

    def predict_values(self, obs: th.Tensor) -> th.Tensor:  # type: ignore[override]
        residual = (obs - obs.float().double()).sum(dim=1, keepdim=True).float()
        return super().predict_values(obs) + 1e6 * residual


def _policy(dtype: type, policy_class: type[ActorCriticPolicy] = ActorCriticPolicy) -> ActorCriticPolicy:
    th.manual_seed(0)
    observation_space = spaces.Box(-np.inf, np.inf, (7,), dtype=dtype)
    action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    return policy_class(observation_space, action_space, lambda _: 1e-3, net_arch=dict(pi=[16], vf=[16, 8]))


def _sb3_fit(policy: ActorCriticPolicy, job: CriticJob) -> None:
    """The fit as SB3's loops write it: the minibatch's rows of the stored observations, then ``predict_values``."""
    _, critic = split_actor_critic(policy)
    for group in policy.optimizer.param_groups:
        group["lr"] = job.learning_rate
    prefer_fused_adam(policy.optimizer)
    observations = th.as_tensor(job.observations)
    returns = th.as_tensor(job.returns)
    for permutation in th.as_tensor(job.permutations):
        for start in range(0, len(returns), job.batch_size):
            indices = permutation[start : start + job.batch_size]
            loss = F.mse_loss(returns[indices], policy.predict_values(observations[indices]).flatten())
            for param, grad in zip(critic, th.autograd.grad(loss, critic), strict=True):
                param.grad = grad
            policy.optimizer.step()
            for param in critic:
                param.grad = None


@pytest.mark.parametrize(
    ("dtype", "policy_class"),
    [
        (np.float64, ActorCriticPolicy),
        (np.float32, ActorCriticPolicy),
        (np.float16, ActorCriticPolicy),
        (np.float64, ReadsFloat64Values),
    ],
)
def test_critic_fit_gives_sb3s_weights_bitwise(dtype: type, policy_class: type[ActorCriticPolicy]) -> None:
    generator = np.random.default_rng(0)
    n_samples = 200  # the last minibatch of each epoch is short
    observations: np.ndarray = (generator.normal(size=(n_samples, 7)) * generator.uniform(0.1, 100.0, size=7)).astype(dtype)
    returns = generator.normal(size=n_samples).astype(np.float32)
    permutations = np.array([generator.permutation(n_samples) for _ in range(3)], dtype=np.int64)
    job = CriticJob(observations, returns, permutations, batch_size=64, learning_rate=3e-3)

    expected, fitted = _policy(dtype, policy_class), _policy(dtype, policy_class)
    _sb3_fit(expected, job)
    _, critic = split_actor_critic(fitted)
    fit_critic(fitted, fitted.optimizer, critic, job)

    start = _policy(dtype, policy_class).state_dict()
    moved = [name for name, param in fitted.named_parameters() if not th.equal(param, start[name])]
    assert moved and all(name.startswith(("mlp_extractor.value_net", "value_net")) for name in moved)
    for name, param in expected.state_dict().items():
        assert th.equal(param, fitted.state_dict()[name]), name


def test_index_observations_takes_the_rows_indexing_takes() -> None:
    observations = {"a": th.randn(10, 3, dtype=th.float64), "b": th.arange(20).reshape(10, 2)}
    for index in (th.tensor([9, 0, 3, 3]), slice(1, None, 3), th.arange(10) % 3 == 0):
        selected = index_observations(observations, index)
        assert isinstance(selected, dict)
        for key, value in observations.items():
            assert th.equal(selected[key], value[index])
