"""Which of a policy's parameters the actor owns and which the critic owns."""

from __future__ import annotations

import torch as th
from stable_baselines3.common.policies import BasePolicy
from torch import nn

from sb3_trpo.common.distributions import distribution_parameters


def split_actor_critic(policy: BasePolicy) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the policy's parameters by what they reach, not by their names.

    Actor parameters are those the action distribution depends on; critic parameters
    are those the value prediction depends on and the distribution does not. A shared
    features extractor therefore belongs to the actor: the trust-region step moves it,
    the critic fit never does. Both lists keep ``policy.parameters()`` order.
    """
    params = list(policy.parameters())
    observation, _ = policy.obs_to_tensor(policy.observation_space.sample())
    with th.enable_grad():
        distribution = policy.get_distribution(observation)  # type: ignore[operator]
        outputs = distribution_parameters(distribution)
        if outputs is None:
            outputs = (distribution.log_prob(distribution.sample().detach()),)
        reaches_actor = th.autograd.grad(th.stack([o.sum() for o in outputs]).sum(), params, allow_unused=True)
        values = policy.predict_values(observation)  # type: ignore[operator]
        reaches_critic = th.autograd.grad(values.sum(), params, allow_unused=True)
    actor = [p for p, g in zip(params, reaches_actor, strict=True) if g is not None]
    critic = [p for p, a, c in zip(params, reaches_actor, reaches_critic, strict=True) if a is None and c is not None]
    return actor, critic
