"""Closed-form Fisher information of SB3's action distributions."""

from __future__ import annotations

import torch as th
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
    kl_divergence,
)
from torch import nn

from sb3_trpo.common.trust_region import (
    DistributionFisherProduct,
    MatrixVectorProduct,
    analytic_fisher_vector_product,
    bernoulli_fisher_product,
    categorical_fisher_product,
    gaussian_fisher_product,
)


def distribution_parameters(distribution: Distribution) -> tuple[th.Tensor, ...] | None:
    """The tensors that define ``distribution`` per sample, or None for an unknown distribution.

    Gaussians (including gSDE) give ``(mean, std)``, categoricals their logits (one
    tensor per sub-space for MultiCategorical), Bernoullis their logits.
    """
    if isinstance(distribution, DiagGaussianDistribution | StateDependentNoiseDistribution):
        return (distribution.distribution.loc, distribution.distribution.scale)
    if isinstance(distribution, MultiCategoricalDistribution):
        return tuple(categorical.logits for categorical in distribution.distribution)
    if isinstance(distribution, CategoricalDistribution | BernoulliDistribution):
        return (distribution.distribution.logits,)
    return _masked_categorical_logits(distribution)


def fisher_product(distribution: Distribution) -> DistributionFisherProduct | None:
    """The closed-form Fisher product matching :func:`distribution_parameters`, or None."""
    if isinstance(distribution, DiagGaussianDistribution | StateDependentNoiseDistribution):
        return gaussian_fisher_product
    if isinstance(distribution, BernoulliDistribution):
        return bernoulli_fisher_product
    if isinstance(distribution, CategoricalDistribution | MultiCategoricalDistribution):
        return categorical_fisher_product
    if _masked_categorical_logits(distribution) is not None:
        return categorical_fisher_product
    return None


def distribution_fisher_vector_product(
    distribution: Distribution, params: list[nn.Parameter], rows: th.Tensor | None = None
) -> MatrixVectorProduct | None:
    """Analytic Fisher-vector product of the mean KL at ``distribution`` (with its graph to ``params``).

    :param rows: boolean mask of the samples the KL averages over (all when None), e.g.
        the real steps of padded sequences
    :return: the product, or None for a distribution without a closed-form Fisher
    """
    outputs = distribution_parameters(distribution)
    closed_form = fisher_product(distribution)
    if outputs is None or closed_form is None:
        return None
    if rows is not None:
        outputs = tuple(output[rows] for output in outputs)
    n_terms = outputs[0].shape[0] * kl_terms_per_sample(distribution)
    return analytic_fisher_vector_product(outputs, params, closed_form, n_terms)


def kl_terms_per_sample(distribution: Distribution) -> int:
    """How many terms per sample SB3's ``kl_divergence`` returns for this distribution.

    SB3 (and so sb3-contrib's TRPO) averages the KL over these terms as well as over
    samples: for a diagonal Gaussian or a Bernoulli the constrained quantity is the KL
    per action dimension, not the KL of the joint distribution (a MultiCategorical's
    KL is summed over its sub-spaces).
    """
    if isinstance(distribution, DiagGaussianDistribution | StateDependentNoiseDistribution):
        return int(distribution.distribution.loc.shape[-1])
    if isinstance(distribution, BernoulliDistribution):
        return int(distribution.distribution.logits.shape[-1])
    return 1


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


def kl_terms(p: Distribution, q: Distribution) -> th.Tensor:
    """``KL(p || q)`` per sample (and per action dimension where SB3's ``kl_divergence`` keeps them).

    sb3-contrib's maskable distributions go through :func:`masked_categorical_kl`, every
    other distribution through SB3's ``kl_divergence``.
    """
    if isinstance(p, MaskableDistribution):
        return masked_categorical_kl(p, q)
    return kl_divergence(p, q)


def _masked_categorical_logits(distribution: Distribution) -> tuple[th.Tensor, ...] | None:
    """Logits of sb3-contrib's maskable distributions (masked entries carry no mass)."""
    if not isinstance(distribution, MaskableDistribution):
        return None
    # MaskableMultiCategoricalDistribution (and its Bernoulli subclass) keeps a list under another name.
    categoricals = getattr(distribution, "distributions", None) or [distribution.distribution]
    return tuple(categorical.logits for categorical in categoricals)
