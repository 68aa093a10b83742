"""Which of a policy's parameters the actor owns and which the critic owns."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Protocol

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_trpo.common.distributions import distribution_parameters


class ActorCritic(Protocol):
    """What the actor/critic split probes of a policy (SB3's ``ActorCriticPolicy`` has it)."""

    observation_space: spaces.Space

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def buffers(self) -> Iterator[th.Tensor]: ...

    def obs_to_tensor(self, observation: Any) -> tuple[PyTorchObs, bool]: ...

    def get_distribution(self, obs: PyTorchObs) -> Distribution: ...

    def predict_values(self, obs: PyTorchObs) -> th.Tensor: ...


@contextlib.contextmanager
def _without_side_effects(policy: ActorCritic) -> Iterator[None]:
    """Eval mode for a probe, then every module's mode, every buffer and the random generators as they were."""
    modes = [(module, module.training) for module in policy.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in policy.buffers()]
    cuda = sorted({p.device.index or 0 for p in policy.parameters() if p.device.type == "cuda"})
    with th.random.fork_rng(devices=cuda):
        for module, _ in modes:
            module.training = False
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode
            with th.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def split_actor_critic(policy: ActorCritic) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the policy's parameters by what they reach, not by their names.

    Actor parameters are those the action distribution depends on; critic parameters
    are those the value prediction depends on and the distribution does not. A shared
    features extractor therefore belongs to the actor: the trust-region step moves it,
    the critic fit never does. Both lists keep ``policy.parameters()`` order.

    The probe is one observation drawn from a copy of the observation space (the
    environment's own space draws nothing), passed in eval mode; afterwards every module's
    mode, every buffer (BatchNorm's running statistics) and torch's generators are as they
    were, so constructing an algorithm changes nothing its rollouts and updates see.
    """
    params = list(policy.parameters())
    with _without_side_effects(policy):
        observation, _ = policy.obs_to_tensor(copy.deepcopy(policy.observation_space).sample())
        with th.enable_grad():
            distribution = policy.get_distribution(observation)
            outputs = distribution_parameters(distribution)
            if outputs is None:
                outputs = (distribution.log_prob(distribution.sample().detach()),)
            reaches_actor = th.autograd.grad(th.stack([o.sum() for o in outputs]).sum(), params, allow_unused=True)
            values = policy.predict_values(observation)
            reaches_critic = th.autograd.grad(values.sum(), params, allow_unused=True)
    actor = [p for p, g in zip(params, reaches_actor, strict=True) if g is not None]
    critic = [p for p, a, c in zip(params, reaches_actor, reaches_critic, strict=True) if a is None and c is not None]
    return actor, critic
