"""What every trust-region algorithm of the package does once: batch, natural-gradient step, critic fit, log.

:class:`TrustRegionAlgorithm` composes the pure functions of :mod:`sb3_trpo.common.trust_region`;
:class:`sb3_trpo.NPG` takes the full step, :class:`sb3_trpo.TRPO` adds the line search, and
the masked and recurrent variants describe their batches as data (an action mask, padded
sequences with a validity mask) that the methods here apply.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn

from sb3_trpo.common.base_algorithm import SeparateCriticAlgorithm
from sb3_trpo.common.critic import CriticJob, index_observations
from sb3_trpo.common.critic_fitter import BackgroundSetting, CriticFitter, background_pays, check_background_setting
from sb3_trpo.common.critic_worker import background_unavailable
from sb3_trpo.common.loading import TRUST_REGION_KEYS
from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.policy_step import (
    ActorStep,
    PolicyBatch,
    PolicyStepStats,
    Restore,
    StepEvaluation,
    batch_fisher_vector_product,
    current_and_old,
    normalized_advantages,
    surrogate,
)
from sb3_trpo.common.rollout import actions_for_log_prob
from sb3_trpo.common.trust_region import (
    LineSearchResult,
    conjugate_gradient,
    damped,
    flatten,
    max_step_size,
    no_step,
)
from sb3_trpo.common.validation import (
    NonFiniteError,
    check_hyperparameter,
    check_hyperparameters,
    check_rollout_finite,
)


class TrustRegionAlgorithm(SeparateCriticAlgorithm):
    """
    The natural-gradient trust-region step with a separately fitted critic, shared by every algorithm of the package.

    Each update solves ``F s = g`` by conjugate gradient (``F`` the Fisher information
    of the policy, ``g`` the gradient of the importance-sampled surrogate), scales ``s`` to
    the trust-region boundary of the quadratic KL model, ``sqrt(2 target_kl / s^T F s)``,
    and hands the step to :meth:`_take_step` (the full step for NPG, a backtracking line
    search for TRPO). The KL that is measured and logged is ``KL(pi_new || pi_old)``,
    averaged over samples (and over action dimensions for Gaussians and Bernoullis), as
    sb3-contrib measures it; its Hessian at the old policy is the same Fisher matrix as that
    of the paper's ``KL(pi_old || pi_new)``.

    One update, piece by piece (:meth:`train`, then :meth:`_policy_step`):

    - surrogate ``E[ratio * A]``: :func:`sb3_trpo.common.policy_step.surrogate`;
    - Fisher-vector product: :func:`sb3_trpo.common.policy_step.batch_fisher_vector_product`, the
      closed form of :func:`sb3_trpo.common.distributions.distribution_fisher_vector_product` or the
      Hessian-vector product (:func:`sb3_trpo.common.trust_region.kl_hessian_vector_product`) of the KL below;
    - conjugate gradient: :func:`sb3_trpo.common.trust_region.conjugate_gradient`;
    - maximal step: :func:`sb3_trpo.common.trust_region.max_step_size`;
    - line search: :func:`sb3_trpo.common.trust_region.backtracking_line_search` (TRPO) or
      :func:`sb3_trpo.common.trust_region.full_step` (NPG), in :meth:`_take_step`, moving the actor
      with :class:`sb3_trpo.common.policy_step.ActorStep`;
    - KL check: :func:`sb3_trpo.common.policy_step.batch_kl`, measured in
      :meth:`sb3_trpo.common.policy_step.ActorStep.evaluate` and held to ``target_kl`` by the line search;
    - critic: :func:`sb3_trpo.common.critic.fit_critic`, run here or in a worker process by
      :class:`sb3_trpo.common.critic_fitter.CriticFitter` (:meth:`_fit_critic`).

    Subclasses describe what differs as data: the policy and buffer classes they accept
    (class attributes), and the inputs their batches carry (:class:`~sb3_trpo.common.policy_step.PolicyBatch`).
    The parameters are those of :class:`sb3_trpo.NPG`, documented there.
    """

    # What a subclass accepts, as data: the policy base class, the action spaces, the
    # rollout buffer classes for flat and for dict observations (a user's buffer must
    # derive from one of them), the options its policy constructor takes, its batch.
    policy_base: ClassVar[type[BasePolicy]] = ActorCriticPolicy
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (
        spaces.Box,
        spaces.Discrete,
        spaces.MultiDiscrete,
        spaces.MultiBinary,
    )
    rollout_buffer_classes: ClassVar[tuple[type[RolloutBuffer], type[RolloutBuffer]]] = (RolloutBuffer, DictRolloutBuffer)
    policy_options: ClassVar[tuple[str, ...]] = ("use_sde",)
    saved_keys: ClassVar[tuple[str, ...]] = TRUST_REGION_KEYS
    batch_class: ClassVar[type[PolicyBatch]] = PolicyBatch
    # Why the background critic fit cannot run, for variants whose rollout reads the critic at every step.
    background_critic_fit_refused: ClassVar[str | None] = None

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
            dict(
                target_kl=target_kl,
                cg_max_steps=cg_max_steps,
                cg_damping=cg_damping,
                cg_residual_tol=cg_residual_tol,
                sub_sampling_factor=sub_sampling_factor,
                n_critic_updates=n_critic_updates,
                batch_size=batch_size,
                gamma=gamma,
                gae_lambda=gae_lambda,
                n_steps=n_steps,
                learning_rate=learning_rate,
                fisher_vector_product=fisher_vector_product,
            )
        )
        self._check_variant_options(use_sde, rollout_buffer_class, background_critic_fit)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            gae_lambda=gae_lambda,
            target_kl=target_kl,
            normalize_advantage=normalize_advantage,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
        )
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_residual_tol = cg_residual_tol
        self.n_critic_updates = n_critic_updates
        self.sub_sampling_factor = sub_sampling_factor
        self.fisher_vector_product = fisher_vector_product
        check_background_setting(background_critic_fit, self.device, self.policy_kwargs.get("optimizer_class", th.optim.Adam))
        self.background_critic_fit = background_critic_fit
        self.actor_parameters, self.critic_parameters = [], []
        self._critic_fitter: CriticFitter | None = None

        if _init_setup_model:
            self._setup_model()

    def _check_variant_options(
        self, use_sde: bool, rollout_buffer_class: type[RolloutBuffer] | None, background_critic_fit: BackgroundSetting
    ) -> None:
        if use_sde and spaces.Box not in self.supported_action_spaces:
            check_hyperparameter("use_sde", use_sde, False, "False (gSDE needs continuous actions)")
        if rollout_buffer_class is not None:
            required = self.rollout_buffer_classes
            check_hyperparameter(
                "rollout_buffer_class",
                rollout_buffer_class,
                issubclass(rollout_buffer_class, required),
                f"a subclass of {' or '.join(cls.__name__ for cls in required)}",
            )
        if background_critic_fit is True and self.background_critic_fit_refused is not None:
            refused = f"False for {type(self).__name__}: {self.background_critic_fit_refused}"
            check_hyperparameter("background_critic_fit", True, False, refused)

    # ------------------------------------------------------------------ setup
    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        options = {name: getattr(self, name) for name in self.policy_options}
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **options, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self._maybe_recommend_cpu()
        if not isinstance(self.policy, self.policy_base):
            raise ValueError(f"{type(self).__name__} needs a {self.policy_base.__name__}, got {type(self.policy).__name__}")
        if self.rollout_buffer_class is None:
            flat, dictionary = self.rollout_buffer_classes
            self.rollout_buffer_class = dictionary if isinstance(self.observation_space, spaces.Dict) else flat
        self.rollout_buffer = self.rollout_buffer_class(
            self.n_steps,
            self.observation_space,
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self._rollout_buffer_arguments(),
            **self.rollout_buffer_kwargs,
        )
        self.actor_parameters, self.critic_parameters = self._split_actor_critic()
        self._critic_fitter = CriticFitter(
            self.policy,
            self.critic_parameters,
            background=self._fits_critic_in_background(),
            adaptive=self.background_critic_fit == "auto",
        )

    def _fits_critic_in_background(self) -> bool:
        """What ``background_critic_fit`` means here: "auto" where it can run and pays, True where it can run."""
        if self.background_critic_fit is False or self.background_critic_fit_refused is not None:
            return False
        reason = background_unavailable(self.device, type(self.policy.optimizer))
        if reason is None:
            return self.background_critic_fit is True or background_pays()
        if self.background_critic_fit is True:
            # A model saved with True, loaded where it cannot run (load builds it with device="auto").
            warnings.warn(
                f"background_critic_fit=True cannot run here ({reason}); the critic is fitted in the training process",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _rollout_buffer_arguments(self) -> dict[str, Any]:
        """Arguments the rollout buffer class needs beyond SB3's (none for SB3's buffers)."""
        return {}

    def _split_actor_critic(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return split_actor_critic(self.policy)

    @property
    def critic_fit_in_progress(self) -> bool:
        """Whether a fit of the critic may still be running in the background worker."""
        return self._critic_fitter is not None and self._critic_fitter.in_progress

    # ------------------------------------------------------------------ update
    def train(self) -> None:
        """Update the policy with one trust-region step, then fit the critic."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        update = self._n_updates + 1
        check_rollout_finite(self.rollout_buffer, update)

        batch = self._policy_batch()
        stats = self._policy_step(batch, update)
        value_loss = self._fit_critic(update)

        self._n_updates += 1
        self._log_update(stats, value_loss)

    def _policy_batch(self) -> PolicyBatch:
        """The whole rollout (every ``sub_sampling_factor``-th sample) as one batch."""
        # The buffer yields the whole rollout at once, in a random order.
        (data,) = list(self.rollout_buffer.get(batch_size=None))
        return self.batch_class(**self._batch_fields(data, slice(None, None, self.sub_sampling_factor)))

    def _batch_fields(self, data: Any, rows: slice | th.Tensor, mask: th.Tensor | None = None) -> dict[str, Any]:
        """The :class:`PolicyBatch` fields of the ``rows`` of the buffer's samples ``data``."""
        advantages = data.advantages[rows]
        if self.normalize_advantage:
            advantages = normalized_advantages(advantages, mask)
        return dict(
            observations=index_observations(data.observations, rows),
            actions=actions_for_log_prob(data.actions[rows], self.action_space),
            old_log_prob=data.old_log_prob[rows],
            advantages=advantages,
            mask=mask,
        )

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        """The current policy's action distribution on the batch."""
        return self.policy.get_distribution(batch.observations)

    def _policy_step(self, batch: PolicyBatch, update: int) -> PolicyStepStats:
        """Natural-gradient direction by CG, scaled to the trust region, applied by :meth:`_take_step`."""
        one_pass = type(self)._distribution is TrustRegionAlgorithm._distribution
        distribution, old_distribution = current_and_old(self._distribution, batch, self.policy if one_pass else None)
        with th.no_grad():
            entropy = old_distribution.entropy()
        objective = surrogate(distribution, batch)
        gradient = flatten(th.autograd.grad(objective, self.actor_parameters, retain_graph=True))
        if not th.isfinite(gradient).all():
            raise NonFiniteError(f"non-finite surrogate gradient in update {update}; the weights were not changed")

        fisher_product = batch_fisher_vector_product(
            self.fisher_vector_product, distribution, old_distribution, batch, self.actor_parameters
        )
        fisher = damped(fisher_product, self.cg_damping)
        cg = conjugate_gradient(fisher, gradient, max_iter=self.cg_max_steps, residual_tol=self.cg_residual_tol)
        search_direction = cg.solution
        max_step = max_step_size(search_direction, fisher(search_direction), self.current_target_kl())
        full_step = max_step * search_direction

        objective_before = objective.item()
        step = ActorStep(self.actor_parameters, full_step, self._distribution, batch, old_distribution)
        # A zero maximal step (no positive curvature) or an overflowed one leaves the actor as it is.
        skipped = max_step == 0.0 or not bool(th.isfinite(full_step).all())
        result = no_step(objective_before) if skipped else self._take_step(step.evaluate, step.restore, objective_before)
        return PolicyStepStats(
            objective_before=objective_before,
            line_search=result,
            cg_residual=cg.residual_norm,
            cg_iterations=cg.n_iterations,
            expected_improvement=0.0 if skipped else float(gradient.dot(full_step)) * result.step_fraction,
            max_step=0.0 if skipped else max_step,
            step_norm=0.0 if skipped else result.step_fraction * float(full_step.norm()),
            entropy=None if entropy is None else batch.mean(entropy).item(),
            max_kl=step.largest_state_kl if result.success else 0.0,
            skipped=skipped,
        )

    def _take_step(self, evaluate: StepEvaluation, restore: Restore, objective_before: float) -> LineSearchResult:
        """Apply a fraction of the full step chosen with ``evaluate``, or ``restore`` the actor."""
        raise NotImplementedError

    # ------------------------------------------------------------------ critic
    def _fit_critic(self, update: int) -> float | None:
        """Fit the value function on the returns, moving only parameters the actor does not use.

        :return: the mean value loss, or None when the fit runs in the background
        """
        learning_rate = self.policy.optimizer.param_groups[0]["lr"]
        job = CriticJob.from_rollout(self.rollout_buffer, self.n_critic_updates, self.batch_size, learning_rate)
        # After the last update of learn() no rollout follows to overlap with (and callbacks
        # reading the logger at the end of training see its value loss).
        return self.critic_fitter.start(job, update, overlap=self.num_timesteps < self._total_timesteps)

    @property
    def critic_fitter(self) -> CriticFitter:
        """Where the critic fits run (in this process or in its background worker), and that worker."""
        assert self._critic_fitter is not None, "the model is not set up"
        return self._critic_fitter

    def finish_critic_fit(self, rollout_end: bool = False) -> None:
        """Finish a critic fit started in the background (see ``background_critic_fit``) and log its value loss.

        ``learn``, ``save``, copying and the end of each rollout call it; code that reads the
        critic while ``learn`` runs (a callback) or after its own call of ``train`` calls it first.

        :param rollout_end: this is the end of the rollout that followed the fit (with
            ``background_critic_fit="auto"``, the CPU time the rollout left idle decides where the next fit runs)
        """
        if self._critic_fitter is None:
            return
        self._critic_fitter.finish(rollout_end)
        loss = self._critic_fitter.take_loss()
        if loss is not None:
            self.logger.record("train/value_loss", loss)

    def _excluded_save_params(self) -> list[str]:
        # The parameter lists are derived from the policy, saved in policy.pth, and rebuilt by _setup_model on load.
        return [*super()._excluded_save_params(), "_critic_fitter", "actor_parameters", "critic_parameters"]

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles take the weights after a fit running in the worker (deepcopy
        # copies the policy before it reaches the critic fitter's own __getstate__).
        critic_fitter = self.__dict__.get("_critic_fitter")
        if critic_fitter is not None:
            critic_fitter.finish()
        return self.__dict__.copy()

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.finish_critic_fit()
        super().save(*args, **kwargs)

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        # Loading replaces the optimizer state that a background worker shares.
        if self._critic_fitter is not None:
            self.finish_critic_fit()
            self._critic_fitter.close()
        super().set_parameters(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def _log_update(self, stats: PolicyStepStats, value_loss: float | None) -> None:
        stats.record(self.logger)
        self.logger.record("train/target_kl", self.current_target_kl())
        if value_loss is not None:
            self.logger.record("train/value_loss", value_loss)
        buffer = self.rollout_buffer
        self.logger.record("train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
