"""The quantities of one trust-region step: its batch, surrogate and KL, the trial of a step, what it did.

:meth:`sb3_trpo.common.trust_region_algorithm.TrustRegionAlgorithm._policy_step` composes
them with the pure functions of :mod:`sb3_trpo.common.trust_region`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.distributions import Normal

from sb3_trpo.common.distributions import distribution_fisher_vector_product, kl_terms
from sb3_trpo.common.rollout_gate import recognised_policy
from sb3_trpo.common.trust_region import LineSearchResult, MatrixVectorProduct, kl_hessian_vector_product, unflatten

# evaluate(step fraction) -> (surrogate, KL) with the actor moved by that fraction of the full step.
StepEvaluation = Callable[[float], tuple[float, float]]
Restore = Callable[[], None]


@dataclass(kw_only=True)
class PolicyBatch:
    """The data the trust-region step is computed on (variants add the inputs their policies take).

    :param observations: observations, one row per sample
    :param actions: the actions taken, in the form the distributions take
    :param old_log_prob: their log-probabilities under the policy that collected them
    :param advantages: their advantages (normalized if the algorithm normalizes them)
    :param mask: False on rows that are not samples (the padding of sequences); None when every row is one
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    mask: th.Tensor | None = None

    def mean(self, values: th.Tensor) -> th.Tensor:
        """Mean of per-row ``values`` over the samples (rows where ``mask`` is True)."""
        return values.mean() if self.mask is None else values[self.mask].mean()


def normalized_advantages(advantages: th.Tensor, mask: th.Tensor | None) -> th.Tensor:
    """Advantages shifted and scaled to mean 0 and standard deviation 1 over the samples ``mask`` selects."""
    samples = advantages if mask is None else advantages[mask]
    return (advantages - samples.mean()) / (samples.std() + 1e-8)


def surrogate(distribution: Distribution, batch: PolicyBatch) -> th.Tensor:
    """Importance-sampled surrogate ``E[ratio * A]`` of the policy whose action distribution is ``distribution``."""
    ratio = th.exp(distribution.log_prob(batch.actions) - batch.old_log_prob)
    return batch.mean(batch.advantages * ratio)


def state_kl(terms: th.Tensor, mask: th.Tensor | None) -> th.Tensor:
    """The KL of each sample's state: the mean of its KL terms (action dimensions), as the mean KL weighs them."""
    per_state = terms.reshape(len(terms), -1).mean(dim=1)
    return per_state if mask is None else per_state[mask]


class BatchKL(NamedTuple):
    """``KL(p || q)`` on a batch.

    :param mean: its mean over the samples and over the terms of SB3's ``kl_divergence``
        (action dimensions of Gaussians and Bernoullis): the KL the trust region bounds
    :param per_state: the KL of each sample's state (see :func:`state_kl`)
    """

    mean: th.Tensor
    per_state: th.Tensor


def batch_kl(p: Distribution, q: Distribution, batch: PolicyBatch) -> BatchKL:
    """``KL(p || q)`` on the batch's samples: the one KL of the step, for its Fisher product and its check."""
    terms = kl_terms(p, q)
    return BatchKL(mean=batch.mean(terms), per_state=state_kl(terms, batch.mask))


def current_and_old(
    distribution: Callable[[PolicyBatch], Distribution], batch: PolicyBatch, policy: BasePolicy | None
) -> tuple[Distribution, Distribution]:
    """The current policy's action distribution on the batch, with its graph, and the same detached (the old policy).

    One forward pass gives both where ``policy`` (None: unknown) is SB3's ``ActorCriticPolicy``
    computation of a diagonal Gaussian on linear layers and activations
    (:func:`~sb3_trpo.common.rollout_gate.recognised_policy`, no convolution): its forward
    recording autograd runs the kernels it runs under ``no_grad``, on the same inputs, and draws
    nothing, so the detached copy holds the no-grad pass's bits. Otherwise the old distribution
    comes from its own pass under ``no_grad``.

    :param distribution: the policy's action distribution on a batch (SB3's returns the policy's
        ``action_dist`` itself, which the next call rebuilds: the old one is a copy)
    """
    if (
        policy is not None
        and recognised_policy(policy)
        and type(policy.action_dist) is DiagGaussianDistribution
        and not any(isinstance(module, nn.Conv2d) for module in policy.modules())
    ):
        current = distribution(batch)
        old = copy.copy(current)
        normal = current.distribution
        assert isinstance(normal, Normal)
        old.distribution = Normal(normal.loc.detach(), normal.scale.detach())
        return current, old
    with th.no_grad():
        old = copy.copy(distribution(batch))
    return distribution(batch), old


def batch_fisher_vector_product(
    method: str,
    distribution: Distribution,
    old_distribution: Distribution,
    batch: PolicyBatch,
    parameters: list[nn.Parameter],
) -> MatrixVectorProduct:
    """The (undamped) Fisher-vector product at the old policy over ``parameters``, on the batch's samples.

    :param method: ``"analytic"`` (the closed form, where the distribution has one) or
        ``"double_backprop"`` (the Hessian-vector product of the mean :func:`batch_kl`)
    :param distribution: the current policy's action distribution on the batch, with its graph to ``parameters``
    :param old_distribution: the same, detached
    """
    if method == "analytic":
        product = distribution_fisher_vector_product(distribution, parameters, batch.mask)
        if product is not None:
            return product
    return kl_hessian_vector_product(batch_kl(distribution, old_distribution, batch).mean, parameters)


class ActorStep:
    """The actor moved by fractions of a full step from where it is when this is made, and measured there.

    :meth:`evaluate` and :meth:`restore` are the ``evaluate`` and ``restore`` of
    :func:`~sb3_trpo.common.trust_region.backtracking_line_search`; ``largest_state_kl`` is the
    largest per-state KL at the fraction evaluated last (0 before any), the logged ``max_kl``.

    :param parameters: the actor's parameters
    :param full_step: the full step, flat
    :param distribution: the current policy's action distribution on a batch
    :param batch: the batch to measure on
    :param old_distribution: the action distribution of the policy before the step
    """

    def __init__(
        self,
        parameters: list[nn.Parameter],
        full_step: th.Tensor,
        distribution: Callable[[PolicyBatch], Distribution],
        batch: PolicyBatch,
        old_distribution: Distribution,
    ):
        self.parameters = parameters
        self.start = [param.detach().clone() for param in parameters]
        self.steps = unflatten(full_step, self.start)
        self.distribution = distribution
        self.batch = batch
        self.old_distribution = old_distribution
        self.largest_state_kl = 0.0

    def evaluate(self, fraction: float) -> tuple[float, float]:
        """Move the actor by ``fraction`` of the full step from its start: surrogate and mean KL there."""
        with th.no_grad():
            for param, start, step in zip(self.parameters, self.start, self.steps, strict=True):
                param.copy_(start + fraction * step)
            candidate = self.distribution(self.batch)
            objective = surrogate(candidate, self.batch).item()
            # KL(new || old), as sb3-contrib measures it (see TrustRegionAlgorithm).
            kl = batch_kl(candidate, self.old_distribution, self.batch)
            self.largest_state_kl = kl.per_state.max().item()
        return objective, kl.mean.item()

    def restore(self) -> None:
        """Put the actor back exactly where it started."""
        with th.no_grad():
            for param, start in zip(self.parameters, self.start, strict=True):
                param.copy_(start)


@dataclass(frozen=True, kw_only=True)
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
    max_kl: float
    skipped: bool = False

    def record(self, logger: Logger) -> None:
        """Record the step under sb3-contrib's keys and the package's diagnostics."""
        search = self.line_search
        logger.record("train/policy_objective", search.objective if search.success else self.objective_before)
        logger.record("train/kl_divergence_loss", search.kl if search.success else 0.0)
        logger.record("train/is_line_search_success", float(search.success))
        logger.record("train/line_search_backtracks", search.n_backtracks)
        logger.record("train/accepted_kl", search.kl)
        logger.record("train/max_kl", self.max_kl)
        logger.record("train/cg_residual", self.cg_residual)
        logger.record("train/cg_iterations", self.cg_iterations)
        logger.record("train/expected_improvement", self.expected_improvement)
        logger.record("train/actual_improvement", search.objective - self.objective_before)
        logger.record("train/max_step_size", self.max_step)
        logger.record("train/step_norm", self.step_norm)
        logger.record("train/skipped_update", float(self.skipped))
        if self.entropy is not None:
            logger.record("train/entropy", self.entropy)
