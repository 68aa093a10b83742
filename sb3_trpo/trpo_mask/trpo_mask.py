"""TRPO with invalid-action masking, on sb3-contrib's maskable policies, rollout buffers and ``ActionMasker``.

The masks the agent acted under are stored with the rollout and applied to every
distribution the trust-region step evaluates (surrogate, KL, Fisher-vector product,
line search), so that masked actions carry no probability mass in any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableRolloutBuffer
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.ppo_mask import MaskablePPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo.common.policy_step import PolicyBatch
from sb3_trpo.trpo.trpo import TRPO
from sb3_trpo.trpo_mask.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

SelfMaskableTRPO = TypeVar("SelfMaskableTRPO", bound="MaskableTRPO")


@dataclass(kw_only=True)
class MaskablePolicyBatch(PolicyBatch):
    """A policy batch with the action masks the agent acted under (all ones where masking was off)."""

    action_masks: th.Tensor


class MaskableTRPO(TRPO):
    """
    TRPO with invalid action masking, for Discrete, MultiDiscrete and MultiBinary actions.

    Rollouts are collected as sb3-contrib's ``MaskablePPO`` collects them: the masks come
    from the environment's ``action_masks()`` method (``sb3_contrib.common.wrappers.ActionMasker``
    adds one), are applied when sampling and are stored in a ``MaskableRolloutBuffer``. The
    trust-region step then evaluates the policy under the same masks. The KL of a
    MultiDiscrete or MultiBinary policy is summed over its sub-spaces (as SB3 does for
    MultiCategorical), so ``target_kl`` bounds the KL of the joint action distribution.
    ``learn(use_masking=False)`` trains without masks, and ``predict(..., action_masks=...)``
    applies masks at inference.

    Paper (masking): https://arxiv.org/abs/2006.14171

    :param policy: The policy model to use: a ``MaskableActorCriticPolicy`` (``"MlpPolicy"``, ``"CnnPolicy"``,
        ``"MultiInputPolicy"``)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate for the value function, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size for the value function
    :param gamma: Discount factor, in (0, 1]
    :param cg_max_steps: maximum number of steps in the Conjugate Gradient algorithm
        for computing the Hessian vector product
    :param cg_damping: damping in the Hessian vector product computation
    :param line_search_shrinking_factor: step-size reduction factor for the line-search
        (i.e., ``theta_new = theta + alpha^i * step``), in (0, 1)
    :param line_search_max_iter: maximum number of iteration for the backtracking line-search
    :param n_critic_updates: number of critic updates (epochs over the rollout) per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator, in [0, 1]
    :param use_sde: must be False: the maskable distributions are discrete
    :param sde_sample_freq: unused (no gSDE)
    :param rollout_buffer_class: ``None`` (a ``MaskableRolloutBuffer`` or ``MaskableDictRolloutBuffer``), or a
        subclass of one of them: the masks must be stored
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize or not the advantage
    :param target_kl: Target Kullback-Leibler divergence between updates (the trust-region radius delta).
        Should be small for stability. Values like 0.01, 0.05. It can be a function of the current
        progress remaining (from 1 to 0), as ``learning_rate``, that is > 0 at progress 1 and 0
    :param sub_sampling_factor: Sub-sample the batch to make computation faster
        see p40-42 of John Schulman thesis http://joschu.net/docs/thesis.pdf
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param fisher_vector_product: how the Fisher-vector product is computed: ``"analytic"``
        (Jacobian-vector product through the distribution parameters, their closed-form
        Fisher, and a vector-Jacobian product back; double backprop for distributions
        without a closed form) or ``"double_backprop"`` (Hessian-vector product of the mean
        KL, as sb3-contrib does). Both give the same product.
    :param cg_residual_tol: conjugate gradient stops once the squared residual norm is below this
    :param background_critic_fit: ``"auto"`` or False (both fit the critic in the training process); True
        is refused: rollouts are collected with ``MaskablePPO``'s loop, which
        evaluates the critic at every step, so the critic fit cannot overlap the rollout
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy_base = MaskableActorCriticPolicy
    batch_class = MaskablePolicyBatch
    supported_action_spaces = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    rollout_buffer_classes = (MaskableRolloutBuffer, MaskableDictRolloutBuffer)
    # Maskable policies take no use_sde argument.
    policy_options = ()
    background_critic_fit_refused = "MaskablePPO's rollout loop evaluates the critic at every step"
    policy: MaskableActorCriticPolicy  # type: ignore[assignment]
    rollout_buffer: MaskableRolloutBuffer
    _use_masking = True

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
        use_masking: bool | None = None,
    ) -> bool:
        """Collect a rollout exactly as ``MaskablePPO`` does, storing the masks in the buffer.

        :param use_masking: whether to sample under the environment's action masks;
            None uses the ``use_masking`` given to :meth:`learn`
        """
        use_masking = self._use_masking if use_masking is None else use_masking
        return MaskablePPO.collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps, use_masking)  # type: ignore[arg-type]

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        Get the policy action from an observation, never choosing an action that ``action_masks`` rules out.

        :param observation: the input observation
        :param state: unused (no recurrent state)
        :param episode_start: unused (no recurrent state)
        :param deterministic: whether to return the most likely valid action instead of a sample
        :param action_masks: boolean masks of the valid actions (``get_action_masks(env)``), or None for no masking
        :return: the model's action and the (unchanged) state
        """
        return self.policy.predict(observation, state, episode_start, deterministic, action_masks=action_masks)

    def learn(  # type: ignore[override]
        self: SelfMaskableTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        use_masking: bool = True,
        progress_bar: bool = False,
    ) -> SelfMaskableTRPO:
        """Train as :meth:`sb3_trpo.TRPO.learn`; ``use_masking=False`` samples without the environment's masks."""
        self._use_masking = use_masking
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _batch_fields(self, data: Any, rows: slice | th.Tensor, mask: th.Tensor | None = None) -> dict[str, Any]:
        return {**super()._batch_fields(data, rows, mask), "action_masks": data.action_masks[rows]}

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        assert isinstance(batch, MaskablePolicyBatch)
        return self.policy.get_distribution(batch.observations, action_masks=batch.action_masks)  # type: ignore[arg-type]
