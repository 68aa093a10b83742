"""Trust Region Policy Optimization: NPG plus a backtracking line search."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_trpo.common.critic_fitter import BackgroundSetting
from sb3_trpo.common.policy_step import Restore, StepEvaluation
from sb3_trpo.common.trust_region import LineSearchResult, backtracking_line_search
from sb3_trpo.common.validation import check_hyperparameters
from sb3_trpo.npg.npg import NPG


class TRPO(NPG):
    """
    Trust Region Policy Optimization (TRPO), a drop-in replacement for ``sb3_contrib.TRPO``.

    The natural-gradient step of :class:`sb3_trpo.NPG`, shrunk by a backtracking line
    search until the KL divergence to the old policy is below ``target_kl`` and the
    surrogate objective improved; when no step qualifies the policy is left exactly
    as it was.

    Paper: https://arxiv.org/abs/1502.05477

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
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
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
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
    :param background_critic_fit: fit the critic in a forked worker process while the next
        rollout is collected, at the lowest CPU priority (``SCHED_IDLE``: on CPU time no other
        process wants); a fit the worker has not finished when the rollout ends is finished in
        the training process. The numbers are those of the fit in the training process; the
        value loss of an update is logged with the next one. ``"auto"`` (the default) does so
        on Linux, on the CPU, with Adam/AdamW and at least two CPUs in the process's affinity,
        for each fit whose previous rollout left at least half a CPU idle (``/proc/stat``; see
        :class:`~sb3_trpo.common.critic_fitter.CriticFitter`): trainings that keep the CPUs busy never
        start a worker. ``True`` always uses it (a ``ValueError`` where it cannot run; a model
        loaded where it cannot run fits in the training process, with a warning), ``False``
        never. The worker moves the policy's weights and the critic's Adam state to shared
        memory; its own memory cost is given in :ref:`background-critic-fit`.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    def __init__(
        self,
        policy: str | type[BasePolicy],
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
        target_kl: float | Schedule = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        fisher_vector_product: str = "analytic",
        cg_residual_tol: float = 1e-10,
        background_critic_fit: BackgroundSetting = "auto",
        _init_setup_model: bool = True,
    ):
        check_hyperparameters(
            dict(line_search_shrinking_factor=line_search_shrinking_factor, line_search_max_iter=line_search_max_iter)
        )
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

    def _take_step(self, evaluate: StepEvaluation, restore: Restore, objective_before: float) -> LineSearchResult:
        return backtracking_line_search(
            evaluate,
            restore,
            objective_before,
            self.current_target_kl(),
            shrinking_factor=self.line_search_shrinking_factor,
            max_iter=self.line_search_max_iter,
        )
