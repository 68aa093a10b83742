"""Trust Region Policy Optimization: NPG plus a backtracking line search."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_trpo.npg import NPG
from sb3_trpo.trust_region import LineSearchResult, backtracking_line_search
from sb3_trpo.validation import check_hyperparameter


class TRPO(NPG):
    """
    Trust Region Policy Optimization (TRPO), a drop-in replacement for ``sb3_contrib.TRPO``.

    The natural-gradient step of :class:`sb3_trpo.NPG`, shrunk by a backtracking line
    search until the KL divergence to the old policy is below ``target_kl`` and the
    surrogate objective improved; when no step qualifies the policy is left exactly
    as it was.

    Paper: https://arxiv.org/abs/1502.05477

    Every parameter of :class:`sb3_trpo.NPG`, plus:

    :param line_search_shrinking_factor: step-size reduction factor for the line-search
        (i.e., ``theta_new = theta + alpha^i * step``), in (0, 1)
    :param line_search_max_iter: maximum number of iteration for the backtracking line-search
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
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
        background_critic_fit: bool = False,
        _init_setup_model: bool = True,
    ):
        check_hyperparameter(
            "line_search_shrinking_factor",
            line_search_shrinking_factor,
            0 < line_search_shrinking_factor < 1,
            "in (0, 1)",
        )
        check_hyperparameter("line_search_max_iter", line_search_max_iter, line_search_max_iter >= 1, ">= 1")
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
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
            background_critic_fit=background_critic_fit,
            _init_setup_model=_init_setup_model,
        )

    def _take_step(
        self,
        evaluate: Callable[[float], tuple[float, float]],
        restore: Callable[[], None],
        objective_before: float,
    ) -> LineSearchResult:
        return backtracking_line_search(
            evaluate,
            restore,
            objective_before,
            self.target_kl,
            shrinking_factor=self.line_search_shrinking_factor,
            max_iter=self.line_search_max_iter,
        )
