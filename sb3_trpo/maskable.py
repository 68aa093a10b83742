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
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.ppo_mask import MaskablePPO
from sb3_contrib.ppo_mask.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo.distributions import distribution_parameters
from sb3_trpo.npg import PolicyBatch, split_actor_critic
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_hyperparameter

SelfMaskableTRPO = TypeVar("SelfMaskableTRPO", bound="MaskableTRPO")

MASKABLE_ACTION_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


@dataclass
class MaskablePolicyBatch(PolicyBatch):
    """A policy batch with the action masks the agent acted under (all ones where masking was off)."""

    action_masks: th.Tensor


def masked_categorical_kl(old: Distribution, new: Distribution) -> th.Tensor:
    """Per-sample ``KL(old || new)`` of masked (multi-)categoricals, summed over the sub-spaces.

    Masked actions have probability exactly zero under ``old`` and add nothing; SB3's
    ``kl_divergence`` does not know sb3-contrib's maskable multi-categoricals.
    """
    old_logits, new_logits = distribution_parameters(old), distribution_parameters(new)
    if not isinstance(old, MaskableDistribution) or old_logits is None or new_logits is None:
        raise TypeError(f"expected sb3-contrib maskable distributions, got {type(old).__name__}")
    total = th.zeros((), dtype=old_logits[0].dtype, device=old_logits[0].device)
    for old_part, new_part in zip(old_logits, new_logits, strict=True):
        old_log_probs = th.log_softmax(old_part, dim=-1)
        new_log_probs = th.log_softmax(new_part, dim=-1)
        probs = old_log_probs.exp()
        terms = th.where(probs > 0, probs * (old_log_probs - new_log_probs), th.zeros_like(probs))
        total = total + terms.sum(dim=-1)
    return total


class MaskableTRPO(TRPO):
    """
    TRPO with invalid action masking, for Discrete, MultiDiscrete and MultiBinary actions.

    Rollouts are collected as sb3-contrib's ``MaskablePPO`` collects them: the masks come
    from the environment's ``action_masks()`` method (``sb3_contrib.common.wrappers.ActionMasker``
    adds one), are applied when sampling and are stored in a ``MaskableRolloutBuffer``. The
    trust-region step then evaluates the policy under the same masks. The KL of a
    MultiDiscrete or MultiBinary policy is summed over its sub-spaces (as SB3 does for
    MultiCategorical), so ``target_kl`` bounds the KL of the joint action distribution.

    Paper (masking): https://arxiv.org/abs/2006.14171

    Every parameter of :class:`sb3_trpo.TRPO`; the policy must be a ``MaskableActorCriticPolicy``
    (``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"``), ``use_sde`` must be False (the
    maskable distributions are discrete) and ``rollout_buffer_class``, when given, a
    ``MaskableRolloutBuffer`` or ``MaskableDictRolloutBuffer``. ``learn(use_masking=False)``
    trains without masks, and ``predict(..., action_masks=...)`` applies masks at inference.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: MaskableActorCriticPolicy  # type: ignore[assignment]
    rollout_buffer: MaskableRolloutBuffer  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[MaskableActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        fisher_vector_product: str = "analytic",
        cg_residual_tol: float = 1e-10,
        _init_setup_model: bool = True,
    ):
        check_hyperparameter("use_sde", use_sde, not use_sde, "False (gSDE needs continuous actions)")
        if rollout_buffer_class is not None:
            check_hyperparameter(
                "rollout_buffer_class",
                rollout_buffer_class,
                issubclass(rollout_buffer_class, MaskableRolloutBuffer | MaskableDictRolloutBuffer),
                "a MaskableRolloutBuffer or MaskableDictRolloutBuffer subclass (the masks must be stored)",
            )
        self._use_masking = True
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            fisher_vector_product=fisher_vector_product,
            cg_residual_tol=cg_residual_tol,
            _init_setup_model=False,
        )
        if self.action_space is not None and not isinstance(self.action_space, MASKABLE_ACTION_SPACES):
            supported = ", ".join(space.__name__ for space in MASKABLE_ACTION_SPACES)
            raise ValueError(
                f"action space {type(self.action_space).__name__} is not supported by MaskableTRPO; "
                f"supported action spaces: {supported}"
            )
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        # Maskable policies take no use_sde argument, unlike the policies OnPolicyAlgorithm builds.
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        if not isinstance(self.policy, MaskableActorCriticPolicy):
            raise ValueError(f"MaskableTRPO needs a MaskableActorCriticPolicy, got {type(self.policy).__name__}")
        if self.rollout_buffer_class is None:
            dict_observations = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = MaskableDictRolloutBuffer if dict_observations else MaskableRolloutBuffer
        self.rollout_buffer = self.rollout_buffer_class(  # type: ignore[assignment]
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )
        self.actor_parameters, self.critic_parameters = split_actor_critic(self.policy)

    def collect_rollouts(  # type: ignore[override]
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

    def predict(  # type: ignore[override]
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

    def _batch_from_samples(self, data: Any, rows: slice) -> MaskablePolicyBatch:
        batch = super()._batch_from_samples(data, rows)
        return MaskablePolicyBatch(**vars(batch), action_masks=data.action_masks[rows])

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        assert isinstance(batch, MaskablePolicyBatch)
        return self.policy.get_distribution(batch.observations, action_masks=batch.action_masks)  # type: ignore[arg-type]

    def _mean_kl(self, p: Distribution, q: Distribution, batch: PolicyBatch) -> th.Tensor:
        return masked_categorical_kl(p, q).mean()

