"""Rollout collection with one batched critic and log-probability pass after the rollout.

The policy does not change during a rollout, so the values and log-probabilities that
SB3 computes step by step can be computed once for the whole buffer afterwards; so can
the bootstrap values of truncated episodes. Per step only the action is sampled, with
the same random draws as SB3's ``policy.forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor


@dataclass
class TruncationBootstraps:
    """Episodes cut by a time limit: where they ended and their last observation."""

    positions: list[tuple[int, int]] = field(default_factory=list)
    observations: list[np.ndarray | dict[str, np.ndarray]] = field(default_factory=list)

    def record(self, position: int, env_index: int, observation: np.ndarray | dict[str, np.ndarray]) -> None:
        self.positions.append((position, env_index))
        self.observations.append(observation)


def _flat_observations(buffer: RolloutBuffer, device: th.device) -> PyTorchObs:
    observations = buffer.observations
    if isinstance(observations, dict):
        return {key: th.as_tensor(value.reshape(-1, *value.shape[2:]), device=device) for key, value in observations.items()}
    return th.as_tensor(observations.reshape(-1, *observations.shape[2:]), device=device)


def _stack(observations: list[np.ndarray | dict[str, np.ndarray]]) -> np.ndarray | dict[str, np.ndarray]:
    first = observations[0]
    if isinstance(first, dict):
        return {key: np.stack([obs[key] for obs in observations]) for key in first}  # type: ignore[index]
    return np.stack(observations)  # type: ignore[arg-type]


def actions_for_log_prob(actions: th.Tensor, action_space: spaces.Space) -> th.Tensor:
    """Buffer actions in the form SB3's distributions take: Discrete a flat long tensor, others float.

    The buffer keeps the action space's dtype (int8 for MultiBinary), which Bernoulli's
    log-probability does not accept.
    """
    if isinstance(action_space, spaces.Discrete):
        return actions.long().flatten()
    return actions.float()


@th.no_grad()
def fill_values_and_log_probs(
    policy: ActorCriticPolicy, buffer: RolloutBuffer, bootstraps: TruncationBootstraps, gamma: float
) -> None:
    """Write values and log-probabilities of the whole buffer, and add truncation bootstraps to rewards."""
    n_steps, n_envs = buffer.buffer_size, buffer.n_envs
    observations = _flat_observations(buffer, policy.device)
    values = policy.predict_values(observations)
    actions = th.as_tensor(buffer.actions.reshape(n_steps * n_envs, -1), device=policy.device)
    log_probs = policy.get_distribution(observations).log_prob(actions_for_log_prob(actions, policy.action_space))
    buffer.values[:] = values.cpu().numpy().reshape(n_steps, n_envs)
    buffer.log_probs[:] = log_probs.cpu().numpy().reshape(n_steps, n_envs)
    if bootstraps.positions:
        terminal = obs_as_tensor(_stack(bootstraps.observations), policy.device)  # type: ignore[arg-type]
        terminal_values = policy.predict_values(terminal).cpu().numpy().flatten()
        for (position, env_index), value in zip(bootstraps.positions, terminal_values, strict=True):
            buffer.rewards[position, env_index] += gamma * value
