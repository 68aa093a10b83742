"""Rollout collection with one batched critic and log-probability pass after the rollout.

The policy does not change during a rollout, so the values and log-probabilities that
SB3 computes step by step can be computed once for the whole buffer afterwards; so can
the bootstrap values of truncated episodes. Per step only the action is sampled, with
the same random draws as SB3's ``policy.forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo.common.validation import check_finite, observation_arrays

ActionSampler = Callable[[np.ndarray | dict[str, np.ndarray]], np.ndarray]


@dataclass
class TruncationBootstraps:
    """Episodes cut by a time limit: where they ended and their last observation."""

    positions: list[tuple[int, int]] = field(default_factory=list)
    observations: list[np.ndarray | dict[str, np.ndarray]] = field(default_factory=list)

    def record(self, position: int, env_index: int, observation: np.ndarray | dict[str, np.ndarray]) -> None:
        self.positions.append((position, env_index))
        self.observations.append(observation)


def action_sampler(policy: BasePolicy, action_shape: tuple[int, ...]) -> ActionSampler:
    """One stochastic action per observation, drawn as SB3's ``ActorCriticPolicy.forward`` draws it.

    Built once per rollout: the policy does not change during one. SB3's own Gaussian MLP
    actor (flattened non-image Box observations, ``Linear``/``Tanh``/``ReLU`` layers) is evaluated
    in NumPy on a copy of its weights, because at a batch of a few observations torch's
    per-operation overhead is most of the cost. Its noise is drawn from torch's generator
    as ``Normal(mean, std).sample()`` draws it (``randn * std + mean``, float32): the same
    random numbers, and actions equal to SB3's up to float32 rounding of the mean.
    Any other policy samples from its distribution.
    """
    mlp = _numpy_gaussian_mlp(policy)
    if mlp is None:

        def sample_distribution(observations: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
            with th.inference_mode():
                distribution = policy.get_distribution(obs_as_tensor(observations, policy.device))  # type: ignore[operator]
                actions = distribution.get_actions().cpu().numpy()
            return actions.reshape((-1, *action_shape))

        return sample_distribution

    layers, std = mlp

    # Refilled in place each step: the same draws as th.randn, without a new tensor per step.
    noise = th.empty(0, dtype=th.float32)

    def sample_gaussian(observations: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        nonlocal noise
        mean = np.asarray(observations, dtype=np.float32)
        mean = mean.reshape(len(mean), -1)
        for layer in layers:
            mean = layer(mean)
        if noise.shape != mean.shape:
            noise = th.empty(mean.shape, dtype=th.float32)
        return (noise.normal_().numpy() * std + mean).reshape((-1, *action_shape))

    return sample_gaussian


NumpyLayer = Callable[[np.ndarray], np.ndarray]


def _numpy_gaussian_mlp(policy: BasePolicy) -> tuple[list[NumpyLayer], np.ndarray] | None:
    """SB3's own Gaussian MLP actor as NumPy layers and standard deviation, or None for any other actor.

    SB3's ``get_distribution`` is the features extractor, the ``MlpExtractor``'s policy
    network (a plain ``nn.Sequential``) and the action head in turn; the copy is exact
    only while no forward hook could change what they compute.
    """
    cls: Any = type(policy)
    if not (
        isinstance(policy, ActorCriticPolicy)
        and type(policy.action_dist) is DiagGaussianDistribution
        and cls.get_distribution is ActorCriticPolicy.get_distribution
        and cls._get_action_dist_from_latent is ActorCriticPolicy._get_action_dist_from_latent
        and isinstance(policy.observation_space, spaces.Box)
        # SB3 scales image observations to [0, 1] before the extractor; only plain float casts are copied.
        and not (policy.normalize_images and is_image_space(policy.observation_space))
        and type(policy.pi_features_extractor) is FlattenExtractor
        and type(policy.mlp_extractor).forward_actor is MlpExtractor.forward_actor
        and type(policy.mlp_extractor.policy_net) is nn.Sequential
    ):
        return None
    modules = [policy.pi_features_extractor, *policy.mlp_extractor.policy_net, policy.action_net]
    hooks = nn.modules.module
    if any(module._forward_hooks or module._forward_pre_hooks for module in modules) or (
        hooks._global_forward_hooks or hooks._global_forward_pre_hooks
    ):
        return None
    layers = []
    for module in modules[1:]:
        layer = _numpy_layer(module)
        if layer is None:
            return None
        layers.append(layer)
    with th.no_grad():
        std = policy.log_std.exp().float().cpu().numpy()
    return layers, std


def _numpy_layer(module: nn.Module) -> NumpyLayer | None:
    if type(module) is nn.Tanh:
        return np.tanh
    if type(module) is nn.ReLU:
        return lambda x: np.maximum(x, np.float32(0.0))
    if type(module) is nn.Linear and module.weight.dtype == th.float32:
        weight = module.weight.detach().cpu().numpy().T.copy()
        bias = np.zeros(weight.shape[1], np.float32) if module.bias is None else module.bias.detach().cpu().numpy().copy()
        return lambda x: x @ weight + bias
    return None


def add_transition(
    buffer: RolloutBuffer,
    observations: np.ndarray | dict[str, np.ndarray],
    actions: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
) -> None:
    """``buffer.add`` without the value and log-probability (filled in after the rollout).

    SB3's own ``RolloutBuffer`` is written directly, as its ``add`` writes it; any other
    buffer class goes through its ``add`` with placeholders.
    """
    if type(buffer) is not RolloutBuffer:
        placeholder = th.zeros(buffer.n_envs)
        buffer.add(observations, actions, rewards, episode_starts, placeholder, placeholder)  # type: ignore[arg-type]
        return
    position = buffer.pos
    buffer.observations[position] = np.reshape(observations, (buffer.n_envs, *buffer.obs_shape))  # type: ignore[arg-type]
    buffer.actions[position] = actions.reshape((buffer.n_envs, buffer.action_dim))
    buffer.rewards[position] = rewards
    buffer.episode_starts[position] = episode_starts
    buffer.pos += 1
    buffer.full = buffer.pos == buffer.buffer_size


def _flat_observations(buffer: RolloutBuffer, device: th.device) -> PyTorchObs:
    observations = buffer.observations
    if isinstance(observations, dict):
        return {key: th.as_tensor(value.reshape(-1, *value.shape[2:]), device=device) for key, value in observations.items()}
    return th.as_tensor(observations.reshape(-1, *observations.shape[2:]), device=device)


def _stack(observations: list[np.ndarray | dict[str, np.ndarray]]) -> np.ndarray | dict[str, np.ndarray]:
    first = observations[0]
    if isinstance(first, dict):
        return {key: np.stack([obs[key] for obs in observations]) for key in first}
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
        terminal = obs_as_tensor(_stack(bootstraps.observations), policy.device)
        terminal_values = policy.predict_values(terminal).cpu().numpy().flatten()
        for (position, env_index), value in zip(bootstraps.positions, terminal_values, strict=True):
            buffer.rewards[position, env_index] += gamma * value


def collect_rollout(
    model: OnPolicyAlgorithm,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    wait_for_critic: Callable[[], None],
) -> bool:
    """``model.collect_rollouts`` as SB3 runs it, with one batched critic pass at the end.

    Per step only actions are sampled (the same draws as SB3's ``policy.forward``, see
    :func:`action_sampler`); values, log-probabilities and the bootstrap values of
    time-limit truncations are computed for the whole rollout afterwards by
    :func:`fill_values_and_log_probs`, once ``wait_for_critic`` has returned. Callbacks see
    SB3's locals except the per-step ``obs_tensor``, ``values`` and ``log_probs``.

    :return: False when a callback stopped training, as SB3's ``collect_rollouts``
    """
    assert model._last_obs is not None, "No previous observation was provided"
    policy = model.policy
    policy.set_training_mode(False)
    n_steps = 0
    rollout_buffer.reset()
    if model.use_sde:
        policy.reset_noise(env.num_envs)
    callback.on_rollout_start()
    bootstraps = TruncationBootstraps()
    sample_actions = action_sampler(policy, model.action_space.shape)  # type: ignore[arg-type]
    while n_steps < n_rollout_steps:
        if model.use_sde and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
            policy.reset_noise(env.num_envs)
        actions = sample_actions(model._last_obs)  # type: ignore[arg-type]
        clipped_actions = actions
        if isinstance(model.action_space, spaces.Box):
            if policy.squash_output:
                clipped_actions = policy.unscale_action(clipped_actions)
            else:
                clipped_actions = np.clip(actions, model.action_space.low, model.action_space.high)
        new_obs, rewards, dones, infos = env.step(clipped_actions)
        check_finite("observations", observation_arrays(new_obs), model._n_updates + 1)  # type: ignore[arg-type]
        model.num_timesteps += env.num_envs
        callback.update_locals({**locals(), "self": model})
        if not callback.on_step():
            return False
        model._update_info_buffer(infos, dones)
        n_steps += 1
        for idx, done in enumerate(dones):
            terminal_obs = infos[idx].get("terminal_observation")
            if done and terminal_obs is not None and infos[idx].get("TimeLimit.truncated", False):
                bootstraps.record(rollout_buffer.pos, idx, terminal_obs)
        add_transition(rollout_buffer, model._last_obs, actions, rewards, model._last_episode_starts)  # type: ignore[arg-type]
        model._last_obs = new_obs  # type: ignore[assignment]
        model._last_episode_starts = dones
    wait_for_critic()
    fill_values_and_log_probs(policy, rollout_buffer, bootstraps, model.gamma)
    with th.no_grad():
        values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    callback.update_locals({**locals(), "self": model})
    callback.on_rollout_end()
    return True
