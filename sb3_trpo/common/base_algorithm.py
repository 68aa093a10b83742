"""What every algorithm of the package adds to SB3's ``OnPolicyAlgorithm``, whatever its update.

:class:`SeparateCriticAlgorithm` holds what TRPO, NPG, their variants and ACKTR share around
their updates: the constructor's checks (the action space and ``n_steps * n_envs`` with a
``ValueError``, sb3-contrib's truncated-minibatch warning), errors that name what to do for an
unknown policy name or a zip another algorithm saved (:mod:`sb3_trpo.common.loading`), the
batched rollout (:func:`sb3_trpo.common.rollout.collect_rollout`), the trust-region radius of
the next update, and ``learn`` without a warning the user did not cause.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import warnings
from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from tqdm import TqdmExperimentalWarning

from sb3_trpo.common.loading import check_saved_by, plain_load_errors, read_saved_data, unknown_policy_error
from sb3_trpo.common.rollout import collect_rollout
from sb3_trpo.common.validation import check_action_space, check_hyperparameter, warn_truncated_batch

SelfSeparateCriticAlgorithm = TypeVar("SelfSeparateCriticAlgorithm", bound="SeparateCriticAlgorithm")


class SeparateCriticAlgorithm(OnPolicyAlgorithm):
    """
    An on-policy algorithm whose actor takes a natural-gradient step and whose critic is fitted on its own.

    Subclasses set :attr:`supported_action_spaces` and :attr:`saved_keys`, and pass their
    SB3 arguments to this constructor, which stores ``batch_size``, ``normalize_advantage``
    and ``target_kl`` under those names (so that ``save``/``load`` and rl-zoo3 configs work).
    """

    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]]
    # Hyperparameters that every zip of this algorithm's family holds (the check of ``load``).
    saved_keys: ClassVar[tuple[str, ...]]
    actor_parameters: list[nn.Parameter]
    critic_parameters: list[nn.Parameter]

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str,
        *,
        learning_rate: float | Schedule,
        n_steps: int,
        batch_size: int,
        gamma: float,
        gae_lambda: float,
        target_kl: float | Schedule,
        normalize_advantage: bool,
        ent_coef: float = 0.0,
        **sb3_arguments: Any,
    ):
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=0.0,
            max_grad_norm=0.0,
            _init_setup_model=False,
            # Checked below with a ValueError instead of SB3's assertion.
            supported_action_spaces=None,
            **sb3_arguments,
        )
        if getattr(self, "action_space", None) is not None:
            check_action_space(type(self).__name__, self.action_space, self.supported_action_spaces)
        if self.env is not None:
            warn_truncated_batch(batch_size, self.n_steps, self.env.num_envs)
        if self.env is not None and normalize_advantage:
            buffer_size = self.env.num_envs * self.n_steps
            check_hyperparameter(
                "n_steps * n_envs",
                buffer_size,
                buffer_size > 1,
                "> 1 with normalize_advantage=True (the advantage standard deviation needs two samples)",
            )
        self.batch_size = batch_size
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl

    def _get_policy_from_name(self, policy_name: str) -> type[BasePolicy]:
        if policy_name not in self.policy_aliases:
            raise unknown_policy_error(type(self).__name__, policy_name, self.policy_aliases)
        return super()._get_policy_from_name(policy_name)

    @classmethod
    def load(
        cls: type[SelfSeparateCriticAlgorithm],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfSeparateCriticAlgorithm:
        # SB3 loads any algorithm's zip into any class, and lets torch's errors on a damaged file through.
        check_saved_by(cls.__name__, cls.saved_keys, path, read_saved_data(path, custom_objects))
        with plain_load_errors(path):
            return super().load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)

    # ----------------------------------------------------------------- rollout
    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Collect ``n_rollout_steps`` per environment as SB3 does (see :func:`sb3_trpo.common.rollout.collect_rollout`)."""
        return collect_rollout(
            self,
            env,
            callback,
            rollout_buffer,
            n_rollout_steps,
            wait_for_critic=lambda: self.finish_critic_fit(rollout_end=True),
            critic_parameters=self.critic_parameters,
            critic_pending=self.critic_fit_in_progress,
        )

    @property
    def critic_fit_in_progress(self) -> bool:
        """Whether a fit of the critic may still be running in the background (never, unless a subclass fits it there)."""
        return False

    def finish_critic_fit(self, rollout_end: bool = False) -> None:
        """Finish a fit of the critic running in the background (nothing to finish unless a subclass fits it there)."""

    # ------------------------------------------------------------------ update
    def current_target_kl(self) -> float:
        """The trust-region radius of the next update: ``target_kl``, or its schedule at the current progress."""
        if callable(self.target_kl):
            return float(self.target_kl(self._current_progress_remaining))
        return float(self.target_kl)

    def learn(
        self: SelfSeparateCriticAlgorithm,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfSeparateCriticAlgorithm:
        # SB3 ignores tqdm.rich's TqdmExperimentalWarning through a filter set when it is imported,
        # which pytest and warnings.catch_warnings reset: the user asked for a bar, not for that warning.
        quiet_bar = warnings.catch_warnings() if progress_bar else contextlib.nullcontext()
        try:
            with quiet_bar:
                if progress_bar:
                    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
                return super().learn(
                    total_timesteps=total_timesteps,
                    callback=callback,
                    log_interval=log_interval,
                    tb_log_name=type(self).__name__ if tb_log_name is None else tb_log_name,
                    reset_num_timesteps=reset_num_timesteps,
                    progress_bar=progress_bar,
                )
        finally:
            # The model a user gets back has its critic fitted.
            self.finish_critic_fit()
