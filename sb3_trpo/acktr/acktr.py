"""ACKTR: actor and critic moved by K-FAC natural-gradient steps inside a trust region."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn

from sb3_trpo.acktr.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.common.base_algorithm import SeparateCriticAlgorithm
from sb3_trpo.common.distributions import kl_terms, kl_terms_per_sample
from sb3_trpo.common.kfac import (
    KroneckerFactors,
    LayerCapture,
    batch_factors,
    gaussian_log_std_natural_step,
    kfac_layers,
    layer_gradients,
    split_layer_matrix,
    step_scale,
    uncovered_parameters,
)
from sb3_trpo.common.loading import ACKTR_KEYS
from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.rollout import actions_for_log_prob
from sb3_trpo.common.validation import (
    NonFiniteError,
    check_hyperparameter,
    check_hyperparameters,
    check_rollout_finite,
)

# ACKTR's own hyperparameters: the test a value must pass, and the allowed range as the error states it.
ACKTR_RULES: dict[str, tuple[Any, str]] = {
    "max_lr": (lambda value: value > 0, "> 0"),
    "ent_coef": (lambda value: value >= 0, ">= 0"),
    "kfac_damping": (lambda value: value > 0, "> 0"),
    "kfac_decay": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "inverse_update_interval": (lambda value: value >= 1, ">= 1"),
    "critic_target_kl": (lambda value: value > 0, "> 0"),
    "use_sde": (lambda value: value is False, "False (gSDE's state-dependent noise has no Kronecker-factored Fisher here)"),
}


@dataclass(frozen=True)
class KFACStep:
    """What one K-FAC step of the actor or the critic did, for the logger."""

    step_size: float
    model_kl: float
    objective: float


class ACKTR(SeparateCriticAlgorithm):
    """
    Actor Critic using Kronecker-Factored Trust Region (ACKTR), on SB3's rollout buffer, policies and GAE.

    Each update moves the actor by ``eta * F^-1 g``: ``g`` the gradient of the surrogate
    ``E[ratio * A]`` (plus ``ent_coef`` times the entropy), ``F`` the policy's Fisher
    approximated by K-FAC (:mod:`sb3_trpo.common.kfac`: per ``nn.Linear``/``nn.Conv2d``
    layer ``A ⊗ G``, from inputs and from pre-activation gradients of actions sampled from
    the policy itself, with running averages and factored Tikhonov damping), and
    ``eta = min(max_lr, sqrt(2 target_kl / s^T F s))``: the model KL ``0.5 eta^2 s^T F s``
    of the step is at most ``target_kl``. There is no line search. A diagonal Gaussian's
    ``log_std`` takes its exact natural step (its Fisher block is ``2 I`` per state, see
    :func:`~sb3_trpo.common.kfac.gaussian_log_std_natural_step`).

    The KL, model and measured, is the package's (and sb3-contrib's): ``KL(pi_new || pi_old)``
    averaged over samples and over the terms SB3's ``kl_divergence`` keeps (action
    dimensions of Gaussians and Bernoullis), so ``target_kl`` means what it means for
    :class:`sb3_trpo.TRPO`; the Fisher is scaled to match.

    The critic (the parameters :func:`~sb3_trpo.common.policies.split_actor_critic` gives
    it, as for TRPO: a shared features extractor moves with the actor) is fitted with K-FAC
    as in the paper: the Fisher of a unit-variance Gaussian on the value, i.e. the
    Gauss-Newton matrix of the squared error, its factors from targets ``value + N(0, 1)``.
    Each of ``n_critic_updates`` epochs over minibatches of ``batch_size`` takes the step
    ``min(learning_rate, sqrt(2 critic_target_kl / s^T F s)) * s`` with ``s = F^-1 (-∇ loss)``:
    ``learning_rate`` is the fraction of the Gauss-Newton step, ``critic_target_kl`` bounds
    half the mean squared change of the values.

    Paper: Wu et al., "Scalable trust-region method for deep reinforcement learning using
    Kronecker-factored approximation" (2017), https://arxiv.org/abs/1708.05144

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The critic's largest step, as a fraction of its Gauss-Newton step, > 0;
        it can be a function of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size of the critic's K-FAC steps
    :param gamma: Discount factor, in (0, 1]
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator, in [0, 1]
    :param target_kl: the trust-region radius of the actor's step: its model KL is at most this, > 0;
        it can be a function of the current progress remaining, > 0 at progress 1 and 0
    :param max_lr: the actor's largest step size ``eta_max`` (the step is at most ``max_lr * F^-1 g``), > 0
    :param ent_coef: Entropy coefficient of the actor's objective, >= 0
    :param kfac_damping: Tikhonov damping ``lambda`` of the Kronecker factors, > 0 (actor and critic)
    :param kfac_decay: weight of the old factors in their running average, in [0, 1). 0 (the default)
        uses each update's rollout alone: averaging over updates mixes in the curvature of
        earlier policies, which makes the model KL of the step understate the measured one
    :param inverse_update_interval: the factors' inverses are recomputed every this many K-FAC
        steps (of the actor; of the critic, counting its minibatch steps), >= 1
    :param n_critic_updates: number of epochs of critic K-FAC steps over the rollout per update, >= 0
    :param critic_target_kl: bound on the model KL of each critic step (a unit-variance Gaussian on the value), > 0
    :param normalize_advantage: Whether to normalize or not the advantage
    :param use_sde: must be False (gSDE is not supported)
    :param sde_sample_freq: unused (gSDE is not supported); kept for SB3's signature
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    saved_keys: ClassVar[tuple[str, ...]] = ACKTR_KEYS
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (
        spaces.Box,
        spaces.Discrete,
        spaces.MultiDiscrete,
        spaces.MultiBinary,
    )

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 2048,
        batch_size: int = 512,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        target_kl: float | Schedule = 0.002,
        max_lr: float = 0.25,
        ent_coef: float = 0.0,
        kfac_damping: float = 0.01,
        kfac_decay: float = 0.0,
        inverse_update_interval: int = 1,
        n_critic_updates: int = 10,
        critic_target_kl: float = 0.5,
        normalize_advantage: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        check_hyperparameters(
            dict(
                learning_rate=learning_rate,
                n_steps=n_steps,
                batch_size=batch_size,
                gamma=gamma,
                gae_lambda=gae_lambda,
                target_kl=target_kl,
                n_critic_updates=n_critic_updates,
            )
        )
        own = dict(
            max_lr=max_lr,
            ent_coef=ent_coef,
            kfac_damping=kfac_damping,
            kfac_decay=kfac_decay,
            inverse_update_interval=inverse_update_interval,
            critic_target_kl=critic_target_kl,
            use_sde=use_sde,
        )
        for name, value in own.items():
            rule, allowed = ACKTR_RULES[name]
            check_hyperparameter(name, value, rule(value), allowed)
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
            ent_coef=ent_coef,
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
        self.max_lr = max_lr
        self.kfac_damping = kfac_damping
        self.kfac_decay = kfac_decay
        self.inverse_update_interval = inverse_update_interval
        self.n_critic_updates = n_critic_updates
        self.critic_target_kl = critic_target_kl
        self.actor_parameters, self.critic_parameters = [], []
        self.actor_factors: KroneckerFactors | None = None
        self.critic_factors: KroneckerFactors | None = None
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ setup
    def _setup_model(self) -> None:
        super()._setup_model()
        self.actor_parameters, self.critic_parameters = split_actor_critic(self.policy)
        self._actor_layers = kfac_layers(self.policy, self.actor_parameters)
        self._critic_layers = kfac_layers(self.policy, self.critic_parameters)
        log_std = getattr(self.policy, "log_std", None)
        self._log_std = log_std if isinstance(self.policy.action_dist, DiagGaussianDistribution) else None
        uncovered = uncovered_parameters(self._actor_layers, self.actor_parameters)
        uncovered += uncovered_parameters(self._critic_layers, self.critic_parameters)
        refused = {id(p) for p in uncovered if p is not self._log_std}
        names = [name for name, p in self.policy.named_parameters() if id(p) in refused]
        if names:
            raise ValueError(
                f"policy parameters {names} are in no nn.Linear or nn.Conv2d layer; "
                "ACKTR's K-FAC covers those layers and a diagonal Gaussian's log_std"
            )
        # A model loaded from a file keeps the factors it was saved with.
        self.actor_factors = self._factors(self.actor_factors)
        self.critic_factors = self._factors(self.critic_factors)

    def _factors(self, loaded: KroneckerFactors | None) -> KroneckerFactors:
        if loaded is not None:
            return loaded.to(self.device)
        return KroneckerFactors(self.kfac_decay, self.kfac_damping, self.inverse_update_interval)

    def _excluded_save_params(self) -> list[str]:
        # Derived from the policy (saved in policy.pth) and rebuilt by _setup_model on load.
        derived = ["actor_parameters", "critic_parameters", "_actor_layers", "_critic_layers", "_log_std"]
        return [*super()._excluded_save_params(), *derived]

    # ------------------------------------------------------------------ update
    def train(self) -> None:
        """One K-FAC trust-region step of the actor, then the critic's K-FAC steps."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        update = self._n_updates + 1
        check_rollout_finite(self.rollout_buffer, update)

        (data,) = list(self.rollout_buffer.get(batch_size=None))
        actor, kl, entropy = self._actor_step(data, update)
        critic = self._critic_steps(update)

        self._n_updates += 1
        self._log_update(actor, kl, entropy, critic)

    def _actor_step(self, data: RolloutBufferSamples, update: int) -> tuple[KFACStep, float, float | None]:
        """The actor's K-FAC step; returns it, the measured mean KL after it, and the entropy before it."""
        actions = actions_for_log_prob(data.actions, self.action_space)
        advantages = data.advantages
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        with LayerCapture(self._actor_layers) as capture:
            # SB3's policy returns its one distribution object, updated in place: keep this state.
            distribution = copy.copy(self.policy.get_distribution(data.observations))
        # Targets drawn from the policy itself: the Fisher, not the empirical Fisher of the taken actions.
        sampled = distribution.sample().detach()
        scale = 1.0 / kl_terms_per_sample(distribution)
        factors = batch_factors(capture, distribution.log_prob(sampled).sum(), len(advantages), scale)
        ratio = th.exp(distribution.log_prob(actions) - data.old_log_prob)
        objective = (ratio * advantages).mean()
        entropy = distribution.entropy()
        if entropy is not None and self.ent_coef > 0:
            objective = objective + self.ent_coef * entropy.mean()
        gradients = dict(zip(map(id, self.actor_parameters), th.autograd.grad(objective, self.actor_parameters), strict=True))
        step, quadratic = self._natural_step(self.actor_factors, self._actor_layers, gradients, factors, "actor", update)
        moves = self._moves(self._actor_layers, step)
        if self._log_std is not None:
            log_std_step = gaussian_log_std_natural_step(gradients[id(self._log_std)], scale)
            quadratic += 2.0 * scale * float((log_std_step**2).sum())
            moves.append((self._log_std, log_std_step))
        eta = step_scale(quadratic, self.current_target_kl(), self.max_lr)
        self._apply(moves, eta, "actor", update)
        with th.no_grad():
            kl = kl_terms(self.policy.get_distribution(data.observations), distribution).mean().item()
        result = KFACStep(step_size=eta, model_kl=0.5 * eta**2 * quadratic, objective=objective.item())
        return result, kl, None if entropy is None else entropy.mean().item()

    def _critic_steps(self, update: int) -> list[KFACStep]:
        """``n_critic_updates`` epochs of K-FAC steps on the value's squared error, one per minibatch."""
        max_lr = self.lr_schedule(self._current_progress_remaining)
        steps = []
        for _ in range(self.n_critic_updates):
            for data in self.rollout_buffer.get(self.batch_size):
                with LayerCapture(self._critic_layers) as capture:
                    values = self.policy.predict_values(data.observations).flatten()
                # log N(value + noise; value, 1) up to a constant: the Gauss-Newton matrix's factors.
                targets = (values + th.randn_like(values)).detach()
                factors = batch_factors(capture, -0.5 * ((targets - values) ** 2).sum(), len(values))
                loss = 0.5 * ((data.returns - values) ** 2).mean()
                grads = th.autograd.grad(-loss, self.critic_parameters)
                gradients = dict(zip(map(id, self.critic_parameters), grads, strict=True))
                step, quadratic = self._natural_step(
                    self.critic_factors, self._critic_layers, gradients, factors, "critic", update
                )
                eta = step_scale(quadratic, self.critic_target_kl, max_lr)
                self._apply(self._moves(self._critic_layers, step), eta, "critic", update)
                steps.append(KFACStep(step_size=eta, model_kl=0.5 * eta**2 * quadratic, objective=2.0 * loss.item()))
        return steps

    def _natural_step(
        self,
        kfac: KroneckerFactors | None,
        layers: dict[str, nn.Linear | nn.Conv2d],
        gradients: dict[int, th.Tensor],
        factors: dict[str, tuple[th.Tensor, th.Tensor]],
        who: str,
        update: int,
    ) -> tuple[dict[str, th.Tensor], float]:
        """Fold the batch's factors in and precondition the layers' gradients (keyed by ``id(parameter)``).

        :return: each layer's step ``G^-1 V A^-1`` and ``s^T F s`` over the layers
        :raises NonFiniteError: before the factors change, if a gradient or a factor is not finite
        """
        assert kfac is not None, "the model is not set up"
        tensors = [*gradients.values(), *(f for pair in factors.values() for f in pair)]
        if not all(th.isfinite(t).all() for t in tensors):
            raise NonFiniteError(f"non-finite {who} gradient or curvature in update {update}; the weights were not changed")
        kfac.update(factors)
        step = kfac.natural_step(dict(layer_gradients(layers, gradients)))
        return step, kfac.quadratic(step)

    @staticmethod
    def _moves(layers: dict[str, nn.Linear | nn.Conv2d], step: dict[str, th.Tensor]) -> list[tuple[nn.Parameter, th.Tensor]]:
        """Each layer parameter with its part of the layer's step."""
        return [
            (parameter, part)
            for name, layer in layers.items()
            for parameter, part in zip(layer.parameters(), split_layer_matrix(layer, step[name]), strict=True)
        ]

    @staticmethod
    def _apply(moves: list[tuple[nn.Parameter, th.Tensor]], eta: float, who: str, update: int) -> None:
        """Move each parameter by ``eta`` times its step, unless a step is not finite."""
        if not math.isfinite(eta) or not all(th.isfinite(step).all() for _, step in moves):
            raise NonFiniteError(f"non-finite {who} step in update {update}; the weights were not changed")
        with th.no_grad():
            for parameter, step in moves:
                parameter.add_(step, alpha=eta)

    # ------------------------------------------------------------------ logging
    def _log_update(self, actor: KFACStep, kl: float, entropy: float | None, critic: list[KFACStep]) -> None:
        assert self.actor_factors is not None and self.critic_factors is not None
        self.logger.record("train/policy_objective", actor.objective)
        self.logger.record("train/model_kl", actor.model_kl)
        self.logger.record("train/kl", kl)
        self.logger.record("train/step_size", actor.step_size)
        self.logger.record("train/target_kl", self.current_target_kl())
        self.logger.record("train/damping", self.kfac_damping)
        self.logger.record("train/actor_condition_number", max(self.actor_factors.condition_numbers()))
        if entropy is not None:
            self.logger.record("train/entropy", entropy)
        if critic:
            self.logger.record("train/value_loss", sum(step.objective for step in critic) / len(critic))
            self.logger.record("train/critic_step_size", sum(step.step_size for step in critic) / len(critic))
            self.logger.record("train/critic_condition_number", max(self.critic_factors.condition_numbers()))
        buffer = self.rollout_buffer
        self.logger.record("train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
        if self._log_std is not None:
            self.logger.record("train/std", th.exp(self._log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
