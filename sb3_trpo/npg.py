"""Natural policy gradient: the trust-region step without the line search.

:class:`NPG` holds everything TRPO needs; :class:`sb3_trpo.TRPO` only adds the
backtracking line search.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution, kl_divergence
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import explained_variance, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo.critic import BackgroundCriticFit, CriticFitJob, fit_critic, index_observations
from sb3_trpo.distributions import distribution_fisher_vector_product, distribution_parameters
from sb3_trpo.rollout import (
    TruncationBootstraps,
    action_sampler,
    actions_for_log_prob,
    add_transition,
    fill_values_and_log_probs,
)
from sb3_trpo.trust_region import (
    LineSearchResult,
    MatrixVectorProduct,
    conjugate_gradient,
    damped,
    flatten,
    kl_hessian_vector_product,
    max_step_size,
    unflatten,
)
from sb3_trpo.validation import check_hyperparameter

SelfNPG = TypeVar("SelfNPG", bound="NPG")

SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
FISHER_VECTOR_PRODUCTS = ("analytic", "double_backprop")


class NonFiniteError(ValueError):
    """Raised when NaN or infinite values would reach the weights; the weights are left as they were."""


@dataclass
class PolicyBatch:
    """The data the trust-region step is computed on (variants add fields in subclasses)."""

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor


@dataclass
class PolicyStepStats:
    """What one trust-region step did, for the logger."""

    objective_before: float
    line_search: LineSearchResult
    cg_residual: float
    cg_iterations: int
    expected_improvement: float
    max_step: float
    step_norm: float
    entropy: float | None
    skipped: bool = False


class NPG(OnPolicyAlgorithm):
    """
    Natural Policy Gradient (NPG) with a separately fitted critic.

    Each update solves ``F s = g`` by conjugate gradient (``F`` the Fisher information
    of the policy, ``g`` the gradient of the importance-sampled surrogate), and moves
    the actor by ``sqrt(2 target_kl / s^T F s) * s``: the step that reaches the
    trust-region boundary of the quadratic KL model. TRPO adds a backtracking line
    search on top (:class:`sb3_trpo.TRPO`).

    The KL that is measured and logged (``train/accepted_kl``) is ``KL(pi_new || pi_old)``,
    averaged over samples (and over action dimensions for Gaussians and Bernoullis), as
    sb3-contrib measures it; its Hessian at the old policy is the same Fisher matrix as that
    of the paper's ``KL(pi_old || pi_new)``. The paper's direction learned worse on
    HalfCheetah-v5 (rl-zoo3 settings, 300k steps, seeds 0-3: 1493, 376, 1527, 1711 against
    2526, 3475, 1502, 1648 with sb3-contrib's direction).

    Papers: Kakade, "A Natural Policy Gradient" (2001); Schulman et al., TRPO (2015).

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate for the value function, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size for the value function
    :param gamma: Discount factor
    :param cg_max_steps: maximum number of steps in the Conjugate Gradient algorithm
        for computing the Hessian vector product
    :param cg_damping: damping in the Hessian vector product computation
    :param n_critic_updates: number of critic updates (epochs over the rollout) per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize or not the advantage
    :param target_kl: Target Kullback-Leibler divergence between updates (the trust-region radius delta).
        Should be small for stability. Values like 0.01, 0.05.
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
        (the default: Jacobian-vector product through the distribution parameters, their
        closed-form Fisher, and a vector-Jacobian product back; double backprop for
        distributions without a closed form) or ``"double_backprop"`` (Hessian-vector
        product of the mean KL, as sb3-contrib does). Both give the same product (tested
        against the dense KL Hessian); the analytic one is faster per policy step on MuJoCo
        MLPs (BENCHMARKS.md).
    :param cg_residual_tol: conjugate gradient stops once the squared residual norm is below this
    :param background_critic_fit: fit the critic in a second process, on another core, while the
        next rollout is collected (CPU only, Adam/AdamW). The numbers are those of the
        sequential fit; the value loss of an update is logged with the next one. Off by default:
        it forks a process, and moves the policy's weights to shared memory.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

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
        check_hyperparameter("target_kl", target_kl, target_kl > 0, "> 0")
        check_hyperparameter("cg_max_steps", cg_max_steps, cg_max_steps >= 1, ">= 1")
        check_hyperparameter("cg_damping", cg_damping, cg_damping >= 0, ">= 0")
        check_hyperparameter("cg_residual_tol", cg_residual_tol, cg_residual_tol >= 0, ">= 0")
        check_hyperparameter("sub_sampling_factor", sub_sampling_factor, sub_sampling_factor >= 1, ">= 1")
        check_hyperparameter("n_critic_updates", n_critic_updates, n_critic_updates >= 0, ">= 0")
        check_hyperparameter("batch_size", batch_size, batch_size >= 1, ">= 1")
        check_hyperparameter("gamma", gamma, 0 < gamma <= 1, "in (0, 1]")
        check_hyperparameter("gae_lambda", gae_lambda, 0 <= gae_lambda <= 1, "in [0, 1]")
        check_hyperparameter("n_steps", n_steps, n_steps >= 1, ">= 1")
        if not callable(learning_rate):
            check_hyperparameter("learning_rate", learning_rate, learning_rate > 0, "> 0 (or a schedule)")
        check_hyperparameter(
            "fisher_vector_product",
            fisher_vector_product,
            fisher_vector_product in FISHER_VECTOR_PRODUCTS,
            f"one of {FISHER_VECTOR_PRODUCTS}",
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,  # the surrogate has no entropy bonus
            vf_coef=0.0,  # the critic is fitted separately
            max_grad_norm=0.0,
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
            _init_setup_model=False,
            # Checked below with a ValueError instead of SB3's assertion.
            supported_action_spaces=None,
        )
        if getattr(self, "action_space", None) is not None and not isinstance(self.action_space, SUPPORTED_ACTION_SPACES):
            supported = ", ".join(space.__name__ for space in SUPPORTED_ACTION_SPACES)
            raise ValueError(
                f"action space {type(self.action_space).__name__} is not supported by {type(self).__name__}; "
                f"supported action spaces: {supported}"
            )
        if self.env is not None and normalize_advantage:
            buffer_size = self.env.num_envs * self.n_steps
            check_hyperparameter(
                "n_steps * n_envs",
                buffer_size,
                buffer_size > 1,
                "> 1 with normalize_advantage=True (the advantage standard deviation needs two samples)",
            )
        self.normalize_advantage = normalize_advantage
        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_residual_tol = cg_residual_tol
        self.target_kl = target_kl
        self.n_critic_updates = n_critic_updates
        self.sub_sampling_factor = sub_sampling_factor
        self.fisher_vector_product = fisher_vector_product
        self.background_critic_fit = background_critic_fit
        self._background_critic: BackgroundCriticFit | None = None
        self._pending_critic_update = 0
        self.actor_parameters: list[nn.Parameter] = []
        self.critic_parameters: list[nn.Parameter] = []

        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        self.actor_parameters, self.critic_parameters = split_actor_critic(self.policy)
        if self.background_critic_fit:
            optimizer = type(self.policy.optimizer)
            check_hyperparameter(
                "background_critic_fit",
                True,
                optimizer in (th.optim.Adam, th.optim.AdamW) and self.device.type == "cpu",
                f"False unless the critic's optimizer is Adam or AdamW on the CPU (got {optimizer.__name__} on {self.device})",
            )

    # ----------------------------------------------------------------- rollout
    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Collect ``n_rollout_steps`` per environment, as SB3 does, with one batched critic pass at the end.

        Per step only actions are sampled (the same draws as SB3's ``policy.forward``, see
        :func:`sb3_trpo.rollout.action_sampler`); values, log-probabilities and the
        bootstrap values of time-limit truncations are computed for the whole rollout
        afterwards by :func:`fill_values_and_log_probs`. Callbacks see the usual locals
        except the per-step ``obs_tensor``, ``values`` and ``log_probs``.
        """
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        bootstraps = TruncationBootstraps()
        sample_actions = action_sampler(self.policy, self.action_space.shape)  # type: ignore[arg-type]
        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            actions = sample_actions(self._last_obs)  # type: ignore[arg-type]
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                if self.policy.squash_output:
                    clipped_actions = self.policy.unscale_action(clipped_actions)
                else:
                    clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)
            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self._check_observations_finite(new_obs)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            for idx, done in enumerate(dones):
                terminal_obs = infos[idx].get("terminal_observation")
                if done and terminal_obs is not None and infos[idx].get("TimeLimit.truncated", False):
                    bootstraps.record(rollout_buffer.pos, idx, terminal_obs)
            add_transition(rollout_buffer, self._last_obs, actions, rewards, self._last_episode_starts)  # type: ignore[arg-type]
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
        self._finish_critic_fit()
        fill_values_and_log_probs(self.policy, rollout_buffer, bootstraps, self.gamma)  # type: ignore[arg-type]
        with th.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _check_observations_finite(self, observations: Any) -> None:
        arrays = observations.values() if isinstance(observations, dict) else [observations]
        for array in arrays:
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise NonFiniteError(
                    f"non-finite observations in the rollout of update {self._n_updates + 1}; the weights were not changed"
                )

    # ------------------------------------------------------------------ update
    def train(self) -> None:
        """Update the policy with one trust-region step, then fit the critic."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        update = self._n_updates + 1
        self._check_rollout_finite(update)

        batch = self._policy_batch()
        stats = self._policy_step(batch, update)
        value_loss = self._fit_critic(update)

        self._n_updates += 1
        self._log_update(stats, value_loss)

    def _check_rollout_finite(self, update: int) -> None:
        buffer = self.rollout_buffer
        observations = buffer.observations
        arrays = {
            "observations": list(observations.values()) if isinstance(observations, dict) else [observations],
            "rewards": [buffer.rewards],
            "values": [buffer.values],
            "advantages": [buffer.advantages],
            "returns": [buffer.returns],
        }
        for what, values in arrays.items():
            if not all(np.isfinite(value).all() for value in values):
                raise NonFiniteError(f"non-finite {what} in the rollout of update {update}; the weights were not changed")

    def _policy_batch(self) -> PolicyBatch:
        # The buffer yields the whole rollout at once, in a random order.
        (data,) = list(self.rollout_buffer.get(batch_size=None))
        return self._batch_from_samples(data, slice(None, None, self.sub_sampling_factor))

    def _batch_from_samples(self, data: Any, rows: slice) -> PolicyBatch:
        """The ``rows`` of the buffer's samples ``data`` as a batch (variants add the fields they store)."""
        actions = actions_for_log_prob(data.actions[rows], self.action_space)
        advantages = data.advantages[rows]
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return PolicyBatch(index_observations(data.observations, rows), actions, data.old_log_prob[rows], advantages)

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        """The current policy's action distribution on the batch."""
        return self.policy.get_distribution(batch.observations)  # type: ignore[operator]

    def _mean_kl(self, p: Distribution, q: Distribution, batch: PolicyBatch) -> th.Tensor:
        """Mean ``KL(p || q)`` over the batch, averaged over terms as SB3's ``kl_divergence`` gives them."""
        return kl_divergence(p, q).mean()

    def _kl_rows(self, batch: PolicyBatch) -> th.Tensor | None:
        """The samples :meth:`_mean_kl` averages over, as a boolean mask; None for all."""
        return None

    def _mean_entropy(self, entropy: th.Tensor, batch: PolicyBatch) -> float:
        """Mean entropy of the old policy over the batch, for the logger."""
        return entropy.mean().item()

    def _surrogate(self, distribution: Distribution, batch: PolicyBatch) -> th.Tensor:
        """Importance-sampled surrogate ``E[ratio * A]``."""
        ratio = th.exp(distribution.log_prob(batch.actions) - batch.old_log_prob)
        return (batch.advantages * ratio).mean()

    def _policy_step(self, batch: PolicyBatch, update: int) -> PolicyStepStats:
        """Natural-gradient direction by CG, scaled to the trust region, applied by :meth:`_take_step`."""
        with th.no_grad():
            old_distribution = copy.copy(self._distribution(batch))
            entropy = old_distribution.entropy()
        distribution = self._distribution(batch)
        objective = self._surrogate(distribution, batch)
        gradient = flatten(th.autograd.grad(objective, self.actor_parameters, retain_graph=True))
        if not th.isfinite(gradient).all():
            raise NonFiniteError(f"non-finite surrogate gradient in update {update}; the weights were not changed")

        fvp = self._fisher_vector_product_fn(batch, distribution, old_distribution)
        fisher = damped(fvp, self.cg_damping)
        cg = conjugate_gradient(fisher, gradient, max_iter=self.cg_max_steps, residual_tol=self.cg_residual_tol)
        search_direction = cg.solution
        objective_before = objective.item()
        max_step = max_step_size(search_direction, fisher(search_direction), self.target_kl)
        full_step = max_step * search_direction
        entropy_value = None if entropy is None else self._mean_entropy(entropy, batch)
        if max_step == 0.0 or not th.isfinite(full_step).all():
            no_step = LineSearchResult(False, 0.0, 0, objective_before, 0.0)
            return PolicyStepStats(
                objective_before, no_step, cg.residual_norm, cg.n_iterations, 0.0, 0.0, 0.0, entropy_value, skipped=True
            )

        original = [param.detach().clone() for param in self.actor_parameters]
        steps = unflatten(full_step, original)

        def set_fraction(fraction: float) -> None:
            with th.no_grad():
                for param, start, step in zip(self.actor_parameters, original, steps, strict=True):
                    param.copy_(start + fraction * step)

        def evaluate(fraction: float) -> tuple[float, float]:
            set_fraction(fraction)
            with th.no_grad():
                candidate = self._distribution(batch)
                new_objective = self._surrogate(candidate, batch).item()
                # KL(new || old), as sb3-contrib measures it (see the class docstring).
                kl = self._mean_kl(candidate, old_distribution, batch).item()
            return new_objective, kl

        def restore() -> None:
            with th.no_grad():
                for param, start in zip(self.actor_parameters, original, strict=True):
                    param.copy_(start)

        result = self._take_step(evaluate, restore, objective_before)
        expected = float(gradient.dot(full_step))
        return PolicyStepStats(
            objective_before,
            result,
            cg.residual_norm,
            cg.n_iterations,
            expected * result.step_fraction,
            max_step,
            result.step_fraction * float(full_step.norm()),
            entropy_value,
        )

    def _take_step(self, evaluate: Any, restore: Any, objective_before: float) -> LineSearchResult:
        """NPG applies the full step; only a non-finite outcome is refused."""
        objective, kl = evaluate(1.0)
        if not (math.isfinite(objective) and math.isfinite(kl)):
            restore()
            return LineSearchResult(False, 0.0, 0, objective_before, 0.0)
        return LineSearchResult(True, 1.0, 0, objective, kl)

    def _fisher_vector_product_fn(
        self, batch: PolicyBatch, distribution: Distribution, old_distribution: Distribution
    ) -> MatrixVectorProduct:
        """The (undamped) Fisher-vector product at the old policy over the actor parameters."""
        if self.fisher_vector_product == "analytic":
            product = distribution_fisher_vector_product(distribution, self.actor_parameters, self._kl_rows(batch))
            if product is not None:
                return product
        kl = self._mean_kl(distribution, old_distribution, batch)
        return kl_hessian_vector_product(kl, self.actor_parameters)

    def _fit_critic(self, update: int) -> float | None:
        """Fit the value function on the returns, moving only parameters the actor does not use.

        :return: the mean value loss, or None when the fit runs in the background
        """
        buffer = self.rollout_buffer
        n_samples = buffer.buffer_size * buffer.n_envs
        # The same random minibatch order as sb3-contrib's buffer.get(batch_size), epoch by epoch.
        permutations = np.array([np.random.permutation(n_samples) for _ in range(self.n_critic_updates)], dtype=np.int64)
        job = CriticFitJob(
            buffer.observations,
            buffer.returns.flatten(),
            permutations.reshape(-1, n_samples),
            self.batch_size,
            self.policy.optimizer.param_groups[0]["lr"],
        )
        if self.background_critic_fit:
            if self._background_critic is None:
                self._background_critic = BackgroundCriticFit(self.policy, self.policy.optimizer, self.critic_parameters)
            self._background_critic.submit(job)
            self._pending_critic_update = update
            return None
        return self._critic_loss(fit_critic(self.policy, self.policy.optimizer, self.critic_parameters, job), update)

    def _critic_loss(self, loss: float | None, update: int) -> float:
        if loss is None:
            raise NonFiniteError(f"non-finite critic weights after the critic fit of update {update}; they were restored")
        return loss

    def _finish_critic_fit(self) -> None:
        """Wait for a critic fit running in the background and log its loss."""
        if self._background_critic is not None and self._background_critic.pending:
            loss = self._critic_loss(self._background_critic.result(), self._pending_critic_update)
            self.logger.record("train/value_loss", loss)

    def _stop_background_critic(self) -> None:
        if self._background_critic is not None:
            self._finish_critic_fit()
            self._background_critic.close()
            self._background_critic = None

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_background_critic"]

    def save(self, *args: Any, **kwargs: Any) -> None:
        self._finish_critic_fit()
        super().save(*args, **kwargs)

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        # Loading replaces the optimizer state that a background worker shares.
        self._stop_background_critic()
        super().set_parameters(*args, **kwargs)

    def __del__(self) -> None:
        if getattr(self, "_background_critic", None) is not None:
            self._background_critic.close()  # type: ignore[union-attr]

    def _log_update(self, stats: PolicyStepStats, value_loss: float | None) -> None:
        search = stats.line_search
        buffer = self.rollout_buffer
        self.logger.record("train/policy_objective", search.objective if search.success else stats.objective_before)
        self.logger.record("train/kl_divergence_loss", search.kl if search.success else 0.0)
        self.logger.record("train/is_line_search_success", float(search.success))
        self.logger.record("train/line_search_backtracks", search.n_backtracks)
        self.logger.record("train/accepted_kl", search.kl)
        self.logger.record("train/cg_residual", stats.cg_residual)
        self.logger.record("train/cg_iterations", stats.cg_iterations)
        self.logger.record("train/expected_improvement", stats.expected_improvement)
        self.logger.record("train/actual_improvement", search.objective - stats.objective_before)
        self.logger.record("train/max_step_size", stats.max_step)
        self.logger.record("train/step_norm", stats.step_norm)
        self.logger.record("train/skipped_update", float(stats.skipped))
        if stats.entropy is not None:
            self.logger.record("train/entropy", stats.entropy)
        if value_loss is not None:
            self.logger.record("train/value_loss", value_loss)
        self.logger.record("train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfNPG,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfNPG:
        try:
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
            self._finish_critic_fit()


def split_actor_critic(policy: BasePolicy) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the policy's parameters by what they reach, not by their names.

    Actor parameters are those the action distribution depends on; critic parameters
    are those the value prediction depends on and the distribution does not. A shared
    features extractor therefore belongs to the actor: the trust-region step moves it,
    the critic fit never does. Both lists keep ``policy.parameters()`` order.
    """
    params = list(policy.parameters())
    observation, _ = policy.obs_to_tensor(policy.observation_space.sample())
    with th.enable_grad():
        distribution = policy.get_distribution(observation)  # type: ignore[operator]
        outputs = distribution_parameters(distribution)
        if outputs is None:
            outputs = (distribution.log_prob(distribution.sample().detach()),)
        reaches_actor = th.autograd.grad(th.stack([o.sum() for o in outputs]).sum(), params, allow_unused=True)
        values = policy.predict_values(observation)  # type: ignore[operator]
        reaches_critic = th.autograd.grad(values.sum(), params, allow_unused=True)
    actor = [p for p, g in zip(params, reaches_actor, strict=True) if g is not None]
    critic = [p for p, a, c in zip(params, reaches_actor, reaches_critic, strict=True) if a is None and c is not None]
    return actor, critic
