"""Rollout collection: SB3's own loop, and a faster one where it provably computes what SB3 computes.

SB3's ``OnPolicyAlgorithm.collect_rollouts`` runs the whole policy, actor and critic, at every
step. The faster loop, :func:`collect_rollout`, draws only the actions per step, bitwise as
``policy.forward`` draws them, and computes the values and log-probabilities of the whole
rollout in one batched pass afterwards. That pass rounds differently from SB3's per-step
passes (relative differences of about 1e-7); everything that drives the trajectory (actions,
observations, rewards, episode starts) is SB3's to the bit, and so are the rewards with the
bootstrap values of time-limit truncations, which are computed one observation at a time as
SB3 computes them.

The batched pass equals the per-step ones only if the policy does not change during the
rollout and computes what SB3's ``ActorCriticPolicy`` computes. So the faster loop runs only
where :func:`batched_rollout_sampler` recognises the policy, the buffer and the callback
exactly; everything else runs SB3's own loop.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common import callbacks as sb3_callbacks
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor, MlpExtractor, NatureCNN
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from torch.nn import functional as F

from sb3_trpo.common.validation import check_finite, observation_arrays
from sb3_trpo.tuning.signals import SignalStopCallback

Observations = np.ndarray | dict[str, np.ndarray]
ActionSampler = Callable[[Observations], np.ndarray]

# The methods through which SB3's rollout and our batched pass run the policy: an override of
# any of them computes something the batched pass cannot be proven to compute.
POLICY_METHODS = (
    "forward",
    "extract_features",
    "predict_values",
    "get_distribution",
    "_get_action_dist_from_latent",
    "evaluate_actions",
)
KNOWN_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    StateDependentNoiseDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
)
# Modules whose forward is SB3's or torch's own, computes each observation of a batch on its
# own (a batch of many rounds as a batch of one, up to float rounding), keeps no state and draws
# no random numbers. BatchNorm and Dropout are not among them: their policies run SB3's loop.
KNOWN_MODULES = frozenset(
    {
        FlattenExtractor,
        NatureCNN,
        CombinedExtractor,
        MlpExtractor,
        nn.Sequential,
        nn.ModuleDict,
        nn.Flatten,
        nn.Identity,
        nn.Linear,
        nn.Conv2d,
        nn.Tanh,
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Sigmoid,
        nn.Softplus,
        nn.Softsign,
        nn.Hardtanh,
        nn.ReLU6,
    }
)
# SB3's callbacks that never change the policy (they read the rollout's locals, evaluate with
# ``predict``, save, log or stop training), and the package's stop of a tuning trial; any other
# callback may, and runs with SB3's loop.
WEIGHT_NEUTRAL_CALLBACKS = frozenset(
    {
        SignalStopCallback,
        sb3_callbacks.CallbackList,
        sb3_callbacks.EveryNTimesteps,
        sb3_callbacks.EvalCallback,
        sb3_callbacks.CheckpointCallback,
        sb3_callbacks.StopTrainingOnRewardThreshold,
        sb3_callbacks.StopTrainingOnMaxEpisodes,
        sb3_callbacks.StopTrainingOnNoModelImprovement,
        sb3_callbacks.ProgressBarCallback,
    }
)
# torch's ``at::internal::GRAIN_SIZE``: element-wise kernels on fewer elements run on one thread.
ELEMENTWISE_GRAIN_SIZE = 32768
# rl-zoo3's, when it is loaded (``python -m rl_zoo3.train`` adds them to every run).
ZOO_WEIGHT_NEUTRAL_CALLBACKS = ("SaveVecNormalizeCallback", "TrialEvalCallback", "RawStatisticsCallback")


# ------------------------------------------------------------------ what the faster loop recognises
def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or getattr(module, "_compiled_call_impl", None) is not None
    )


def _global_hooks() -> bool:
    registry = nn.modules.module
    return bool(
        registry._global_forward_hooks
        or registry._global_forward_pre_hooks
        or registry._global_backward_hooks
        or registry._global_backward_pre_hooks
    )


def recognised_policy(policy: BasePolicy) -> bool:
    """Whether ``policy`` is SB3's ``ActorCriticPolicy`` computation exactly.

    That is: none of :data:`POLICY_METHODS` overridden, a distribution of
    :data:`KNOWN_DISTRIBUTIONS`, every submodule of a type in :data:`KNOWN_MODULES`, and no
    hook (forward, backward, global) or ``compile()`` anywhere in the module tree.
    """
    cls = type(policy)
    return (
        isinstance(policy, ActorCriticPolicy)
        and all(getattr(cls, name) is getattr(ActorCriticPolicy, name) for name in POLICY_METHODS)
        and type(policy.action_dist) in KNOWN_DISTRIBUTIONS
        and all(type(module) in KNOWN_MODULES for module in policy.modules() if module is not policy)
        and not any(_has_hooks(module) for module in policy.modules())
        and not _global_hooks()
    )


def weight_neutral(callback: BaseCallback) -> bool:
    """Whether ``callback`` and every callback it calls are of a type known never to change the policy.

    ``learn(callback=None)`` runs an empty ``ConvertCallback``, which calls nothing.
    """
    if type(callback) is sb3_callbacks.ConvertCallback:
        return callback.callback is None
    neutral = set(WEIGHT_NEUTRAL_CALLBACKS)
    zoo = sys.modules.get("rl_zoo3.callbacks")
    if zoo is not None:
        neutral.update(getattr(zoo, name) for name in ZOO_WEIGHT_NEUTRAL_CALLBACKS if hasattr(zoo, name))
    if type(callback) not in neutral:
        return False
    children = [*getattr(callback, "callbacks", []), getattr(callback, "callback", None)]
    children.append(getattr(callback, "callback_on_new_best", None))
    return all(child is None or weight_neutral(child) for child in children)


def batched_rollout_sampler(policy: BasePolicy, buffer: RolloutBuffer, callback: BaseCallback) -> ActionSampler | None:
    """The per-step action sampler of the batched loop, or None where SB3's loop must run.

    The batched loop needs a :func:`recognised_policy`, SB3's own ``RolloutBuffer`` or
    ``DictRolloutBuffer`` (their ``add`` and ``compute_returns_and_advantage``), and a
    :func:`weight_neutral` callback: then nothing that runs during the rollout changes the
    policy, and the batched pass sees the weights every step saw.
    """
    if type(buffer) not in (RolloutBuffer, DictRolloutBuffer) or not weight_neutral(callback):
        return None
    if not recognised_policy(policy):
        return None
    return action_sampler(policy)  # type: ignore[arg-type]


# ------------------------------------------------------------------ actions, bitwise as SB3 draws them
def action_sampler(policy: ActorCriticPolicy) -> ActionSampler:
    """One stochastic action per observation, bitwise as SB3's ``policy.forward`` draws it.

    ``forward`` computes the values before the distribution, but the critic draws no random
    numbers, so the actor alone draws the same actions: ``get_distribution`` then
    ``get_actions``, under ``no_grad``, from the same observation tensor. A Gaussian MLP actor
    takes :func:`gaussian_mlp_sampler`, the same computation without its Python overhead.
    """
    sampler = gaussian_mlp_sampler(policy)
    if sampler is not None:
        return sampler
    shape = (-1, *policy.action_space.shape)  # type: ignore[misc]
    return functools.partial(_sb3_actions, policy, shape=shape)


def gaussian_mlp_sampler(policy: ActorCriticPolicy) -> ActionSampler | None:
    """SB3's Gaussian MLP actor on the CPU without module calls and distribution objects, or None for other actors.

    For flat (non-image) Box observations, a ``FlattenExtractor`` and a Gaussian head, SB3's
    ``get_distribution(obs).get_actions()`` is ``obs.float()``, the flatten, each layer of
    ``mlp_extractor.policy_net`` and ``action_net``, then ``th.normal(mean, std)`` with
    ``std = log_std.exp()``, which fills a new tensor by ``normal_``, then ``mul_(std).add_(mean)``.
    The same operations run here on the same inputs, so they give the same bits:

    - the cast to float32 and the flatten;
    - each layer's own ``forward`` (what ``layer(x)`` runs without hooks, which
      :func:`recognised_policy` checks; a ``Linear`` layer's ``F.linear`` with the parameters
      read from the module's dict at every step), in inference mode, which skips autograd's
      bookkeeping and calls the same kernels as SB3's ``no_grad``; with MKL on one thread
      where :func:`one_thread_gives_the_same_bits` shows that this computes what torch's
      thread count computes for the batch's shapes (with more threads, each small product
      wakes a sleeping OpenMP worker, which costs more than the environment step);
    - ``normal_`` on a tensor of the mean's shape from the same generator (the same draws in
      the same order), then the float32 product and sum in NumPy (IEEE multiplication and
      addition, rounded once each, as ``mul_`` and ``add_``).

    ``Normal`` refuses a NaN mean or a standard deviation that is not positive: such a step
    is handed, before anything is drawn, to SB3's own ``get_distribution(obs).get_actions()``,
    which draws or raises exactly as SB3 would.
    """
    if not (
        policy.device.type == "cpu"
        and type(policy.action_dist) is DiagGaussianDistribution
        and isinstance(policy.observation_space, spaces.Box)
        and not (policy.normalize_images and is_image_space(policy.observation_space))
        and type(policy.pi_features_extractor) is FlattenExtractor
        and type(policy.mlp_extractor.policy_net) is nn.Sequential
    ):
        return None
    flatten = policy.pi_features_extractor.flatten
    modules = [*policy.mlp_extractor.policy_net, policy.action_net]
    layers = [_linear(module._parameters) if type(module) is nn.Linear else module.forward for module in modules]
    weights = [module._parameters for module in modules if type(module) is nn.Linear]
    own_parameters = policy._parameters
    shape = (-1, *policy.action_space.shape)  # type: ignore[misc]
    set_mkl_threads = mkl_thread_setter()
    one_thread: dict[tuple, bool] = {}
    noise: dict[tuple[int, ...], th.Tensor] = {}

    def sample(observations: Observations) -> np.ndarray:
        with th.inference_mode():
            latent = flatten.forward(th.as_tensor(observations).float())
            previous_threads = None
            threads = th.get_num_threads()
            if set_mkl_threads is not None and threads > 1:
                layout = (threads, latent.shape, latent.stride(), *_layouts(weights))
                if layout not in one_thread:
                    one_thread[layout] = one_thread_gives_the_same_bits(modules, latent, set_mkl_threads)
                if one_thread[layout]:
                    previous_threads = set_mkl_threads(1)
            try:
                for layer in layers:
                    latent = layer(latent)
            finally:
                if previous_threads is not None:
                    set_mkl_threads(previous_threads)  # type: ignore[misc]
            mean = latent.numpy()
            std = own_parameters["log_std"].exp().numpy()  # type: ignore[union-attr]
            if np.isnan(mean).any() or not (std > 0).all():
                return _sb3_actions(policy, observations, shape)
            if mean.shape not in noise:
                noise[mean.shape] = th.empty(mean.shape)
            standard_normal = noise[mean.shape].normal_().numpy()
        return (standard_normal * std + mean).reshape(shape)

    return sample


def _sb3_actions(policy: ActorCriticPolicy, observations: Observations, shape: tuple[int, ...]) -> np.ndarray:
    """SB3's own ``get_distribution(obs).get_actions()``, which draws or raises as SB3 does."""
    with th.no_grad():
        actions = policy.get_distribution(obs_as_tensor(observations, policy.device)).get_actions()
    return actions.cpu().numpy().reshape(shape)


def _linear(parameters: dict[str, nn.Parameter | None]) -> Callable[[th.Tensor], th.Tensor]:
    """``nn.Linear.forward`` with the weight and bias read from the module's parameter dict at every call."""

    def linear(latent: th.Tensor) -> th.Tensor:
        return F.linear(latent, parameters["weight"], parameters["bias"])  # type: ignore[arg-type]

    return linear


@functools.cache
def mkl_thread_setter() -> Callable[[int], int] | None:
    """MKL's ``mkl_set_num_threads_local`` in torch's library, or None where torch does not compute with MKL.

    It sets the number of threads MKL uses in the calling thread only and returns the previous
    setting (0: the global one), so nothing else in the process computes on fewer threads.
    """
    if not th.backends.mkl.is_available():
        return None
    try:
        setter = ctypes.CDLL(str(Path(th.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    setter.argtypes = [ctypes.c_int]
    setter.restype = ctypes.c_int
    return setter


def _layouts(weights: list[dict[str, nn.Parameter | None]]) -> list[tuple]:
    return [(w["weight"].shape, w["weight"].stride(), w["bias"] is not None) for w in weights]  # type: ignore[union-attr]


def one_thread_gives_the_same_bits(modules: list[nn.Module], latent: th.Tensor, set_mkl_threads: Callable[[int], int]) -> bool:
    """Whether ``modules`` give the same bits with MKL on one thread as on torch's thread count, for inputs like ``latent``.

    MKL picks its kernel, and how it splits the product among threads, from the shapes, the
    memory layout and the thread count, not from the values (for 7 rows on 2 threads it splits
    the rows and rounds differently). So the layers are computed on random values laid out as
    the real ones, with both settings: different kernels would give different bits. The other
    layers' element-wise kernels split a tensor among threads only from
    ``at::internal::GRAIN_SIZE`` (32,768) elements; larger outputs are refused.
    """
    generator = th.Generator().manual_seed(0)

    def like(tensor: th.Tensor) -> th.Tensor:
        return th.empty_strided(tensor.shape, tensor.stride()).copy_(th.randn(tensor.shape, generator=generator))

    default = like(latent)
    one = default.clone()
    for module in modules:
        if type(module) is nn.Linear:
            weight = like(module.weight)
            bias = None if module.bias is None else like(module.bias)
            default = F.linear(default, weight, bias)
            previous = set_mkl_threads(1)
            try:
                one = F.linear(one, weight, bias)
            finally:
                set_mkl_threads(previous)
        else:
            default, one = module(default), module(one)
        if default.numel() >= ELEMENTWISE_GRAIN_SIZE or not th.equal(default, one):
            return False
    return True


# ------------------------------------------------------------------ the buffer
def add_transition(
    buffer: RolloutBuffer,
    observations: Observations,
    actions: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
) -> None:
    """``buffer.add`` without the value and log-probability (filled in after the rollout).

    SB3's ``RolloutBuffer`` is written directly, as its ``add`` writes it; a
    ``DictRolloutBuffer`` goes through its ``add`` with placeholders.
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


@dataclass
class TruncationBootstraps:
    """Steps where a time limit cut an episode, kept until the critic can be evaluated.

    SB3 adds ``gamma * V(terminal observation)`` to the step's reward, evaluating one
    observation at a time; :meth:`add_to` does the same, with the same expression on a copy
    of the same reward array, so the rewards are SB3's to the bit.
    """

    steps: list[tuple[int, np.ndarray, list[tuple[int, Observations]]]] = field(default_factory=list)

    def record(self, position: int, rewards: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """Keep the truncations of the step written at ``position`` (``infos`` indexed only where done, as SB3)."""
        truncated = [
            (idx, infos[idx]["terminal_observation"])
            for idx, done in enumerate(dones)
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False)
        ]
        if truncated:
            self.steps.append((position, np.array(rewards), truncated))

    def add_to(self, buffer: RolloutBuffer, policy: BasePolicy, gamma: float) -> None:
        """Add the bootstrap values to the buffer's rewards."""
        for position, rewards, truncated in self.steps:
            for idx, observation in truncated:
                terminal_obs = policy.obs_to_tensor(observation)[0]
                with th.no_grad():
                    terminal_value = policy.predict_values(terminal_obs)[0]  # type: ignore[operator]
                rewards[idx] += gamma * terminal_value
            buffer.rewards[position] = np.array(rewards)


def _flat_observations(buffer: RolloutBuffer, rows: int, device: th.device) -> PyTorchObs:
    observations = buffer.observations
    if isinstance(observations, dict):
        return {
            key: th.as_tensor(value[:rows].reshape(-1, *value.shape[2:]), device=device) for key, value in observations.items()
        }
    return th.as_tensor(observations[:rows].reshape(-1, *observations.shape[2:]), device=device)


def actions_for_log_prob(actions: th.Tensor, action_space: spaces.Space) -> th.Tensor:
    """Buffer actions in the form SB3's distributions take: Discrete a flat long tensor, others float.

    The buffer keeps the action space's dtype (int8 for MultiBinary), which Bernoulli's
    log-probability does not accept.
    """
    if isinstance(action_space, spaces.Discrete):
        return actions.long().flatten()
    return actions.float()


@th.no_grad()
def fill_values_and_log_probs(policy: ActorCriticPolicy, buffer: RolloutBuffer) -> None:
    """Write the values and log-probabilities of the steps in the buffer, in one batched pass."""
    rows, n_envs = buffer.pos, buffer.n_envs
    if rows == 0:
        return
    observations = _flat_observations(buffer, rows, policy.device)
    values = policy.predict_values(observations)
    actions = th.as_tensor(buffer.actions[:rows].reshape(rows * n_envs, -1), device=policy.device)
    log_probs = policy.get_distribution(observations).log_prob(actions_for_log_prob(actions, policy.action_space))
    buffer.values[:rows] = values.cpu().numpy().reshape(rows, n_envs)
    buffer.log_probs[:rows] = log_probs.cpu().numpy().reshape(rows, n_envs)


# ------------------------------------------------------------------ the loop
def collect_rollout(
    model: OnPolicyAlgorithm,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    wait_for_critic: Callable[[], None],
) -> bool:
    """``model.collect_rollouts``: SB3's loop, or the batched one where it computes the same.

    Where :func:`batched_rollout_sampler` gives no sampler, SB3's own
    ``OnPolicyAlgorithm.collect_rollouts`` runs (after ``wait_for_critic``: it reads the critic at
    every step). Otherwise per step only actions are sampled; values and log-probabilities are
    computed for the whole rollout afterwards by :func:`fill_values_and_log_probs`, and the
    truncation bootstraps by :class:`TruncationBootstraps`, once ``wait_for_critic`` has
    returned. The batched loop leaves what SB3's leaves (buffer, ``num_timesteps``,
    ``_last_obs``, ``_last_episode_starts``, info buffer, eval mode), also when a callback stops
    training; its callbacks see SB3's locals except the per-step ``obs_tensor``, ``values`` and
    ``log_probs``.

    :return: False when a callback stopped training, as SB3's ``collect_rollouts``
    """
    assert model._last_obs is not None, "No previous observation was provided"
    policy = model.policy
    sample_actions = batched_rollout_sampler(policy, rollout_buffer, callback)
    if sample_actions is None:
        wait_for_critic()
        return OnPolicyAlgorithm.collect_rollouts(model, env, callback, rollout_buffer, n_rollout_steps)
    policy.set_training_mode(False)
    n_steps = 0
    rollout_buffer.reset()
    if model.use_sde:
        policy.reset_noise(env.num_envs)
    callback.on_rollout_start()
    bootstraps = TruncationBootstraps()

    def fill_buffer() -> None:
        wait_for_critic()
        fill_values_and_log_probs(policy, rollout_buffer)
        bootstraps.add_to(rollout_buffer, policy, model.gamma)

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
            fill_buffer()
            return False
        model._update_info_buffer(infos, dones)
        n_steps += 1
        bootstraps.record(rollout_buffer.pos, rewards, dones, infos)
        add_transition(rollout_buffer, model._last_obs, actions, rewards, model._last_episode_starts)  # type: ignore[arg-type]
        model._last_obs = new_obs  # type: ignore[assignment]
        model._last_episode_starts = dones
    fill_buffer()
    with th.no_grad():
        values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    callback.update_locals({**locals(), "self": model})
    callback.on_rollout_end()
    return True
