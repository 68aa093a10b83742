"""Trust-region mathematics as pure functions of tensors and callables.

Nothing here knows about SB3 algorithms: the algorithm classes compose these pieces.
Every function is unit-tested against dense linear algebra on small problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch as th
from torch import nn

MatrixVectorProduct = Callable[[th.Tensor], th.Tensor]
# Maps the distribution parameters of the old policy and their tangents to the
# per-sample Fisher information applied to those tangents.
DistributionFisherProduct = Callable[[Sequence[th.Tensor], Sequence[th.Tensor]], list[th.Tensor]]


def flatten(tensors: Sequence[th.Tensor]) -> th.Tensor:
    """Concatenate tensors into one flat vector."""
    return th.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: th.Tensor, like: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Split a flat vector into tensors shaped like ``like``."""
    chunks = th.split(vector, [t.numel() for t in like])
    return [chunk.view_as(t) for chunk, t in zip(chunks, like, strict=True)]


@dataclass(frozen=True)
class ConjugateGradientResult:
    """Solution of ``A x = b`` by conjugate gradient.

    :param solution: the approximate solution ``x``
    :param residual_norm: Euclidean norm of ``b - A x`` (as tracked by the recurrence)
    :param n_iterations: number of matrix-vector products spent on iterations
    """

    solution: th.Tensor
    residual_norm: float
    n_iterations: int


def conjugate_gradient(
    matrix_vector_product: MatrixVectorProduct,
    b: th.Tensor,
    max_iter: int = 10,
    residual_tol: float = 1e-10,
) -> ConjugateGradientResult:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given only ``v -> A v``.

    Starts from ``x = 0`` and stops after ``max_iter`` iterations or once the squared
    residual norm falls below ``residual_tol``.

    :param matrix_vector_product: function returning ``A v``
    :param b: right-hand side
    :param max_iter: maximum number of iterations (>= 1)
    :param residual_tol: tolerance on the squared residual norm
    :return: the solution, its residual norm and the iterations spent
    """
    x = th.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual.dot(residual)
    n_iterations = 0
    # The squared residual is read once per iteration to decide whether to stop.
    while n_iterations < max_iter and float(residual_sq) >= residual_tol:
        a_direction = matrix_vector_product(direction)
        alpha = residual_sq / direction.dot(a_direction)
        x += alpha * direction
        residual -= alpha * a_direction
        new_residual_sq = residual.dot(residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
        n_iterations += 1
    return ConjugateGradientResult(x, math.sqrt(max(float(residual_sq), 0.0)), n_iterations)


def max_step_size(search_direction: th.Tensor, fisher_times_direction: th.Tensor, target_kl: float) -> float:
    """Scale putting ``search_direction`` on the trust-region boundary of the quadratic KL model.

    Solves ``0.5 * (beta s)^T F (beta s) = target_kl`` for ``beta``: ``sqrt(2 target_kl / s^T F s)``.
    Returns 0 when ``s^T F s`` is not positive (no meaningful step).
    """
    curvature = float(search_direction.dot(fisher_times_direction))
    if not math.isfinite(curvature) or curvature <= 0.0:
        return 0.0
    return math.sqrt(2.0 * target_kl / curvature)


def damped(matrix_vector_product: MatrixVectorProduct, damping: float) -> MatrixVectorProduct:
    """Return ``v -> A v + damping * v``."""

    def product(vector: th.Tensor) -> th.Tensor:
        return matrix_vector_product(vector) + damping * vector

    return product


def kl_hessian_vector_product(kl: th.Tensor, params: Sequence[nn.Parameter]) -> MatrixVectorProduct:
    """Hessian-vector product of a scalar KL by double backpropagation.

    This is the fallback for distributions without a closed-form Fisher. At the old
    policy the Hessian of ``KL(pi_old || pi)`` equals the Fisher information matrix.

    :param kl: mean KL divergence, differentiable with respect to ``params``
    :param params: parameters the product is taken over
    """
    grad_kl = flatten(th.autograd.grad(kl, params, create_graph=True))

    def product(vector: th.Tensor) -> th.Tensor:
        return flatten(th.autograd.grad(grad_kl.dot(vector), params, retain_graph=True))

    return product


def analytic_fisher_vector_product(
    outputs: Sequence[th.Tensor],
    params: Sequence[nn.Parameter],
    fisher_product: DistributionFisherProduct,
    n_terms: int,
) -> MatrixVectorProduct:
    """Fisher-vector product ``J^T M J v / N`` through the distribution parameters.

    ``J`` is the Jacobian of the distribution parameters ``outputs`` (means, scales,
    logits, ...) with respect to ``params``, ``M`` the closed-form per-sample Fisher of
    the distribution in those parameters, ``N`` the number of terms the KL is averaged
    over (samples, times action dimensions where the KL is taken per dimension).
    ``u -> J^T u`` is built once as a graph that is linear in ``u``; differentiating
    ``<J^T u, v>`` with respect to ``u`` gives ``J v``, and ``J^T (M J v)`` is a backward
    pass through the forward graph. Only reverse mode is used, and the forward pass is
    not repeated per product.

    :param outputs: the distribution-parameter tensors, differentiable with respect to ``params``
    :param params: the parameters the product is taken over
    :param fisher_product: closed-form Fisher of the distribution, see ``FISHER_PRODUCTS``
    :param n_terms: the number of terms the mean KL averages
    """
    old_outputs = [output.detach() for output in outputs]
    probes = [th.zeros_like(output, requires_grad=True) for output in outputs]
    transposed = th.autograd.grad(outputs, params, grad_outputs=probes, create_graph=True, allow_unused=True)
    reached = [index for index, grad in enumerate(transposed) if grad is not None]

    def product(vector: th.Tensor) -> th.Tensor:
        pieces = unflatten(vector, params)
        tangents = th.autograd.grad(
            [transposed[i] for i in reached],
            probes,
            grad_outputs=[pieces[i] for i in reached],
            retain_graph=True,
            allow_unused=True,
        )
        tangents = tuple(th.zeros_like(o) if t is None else t for t, o in zip(tangents, outputs, strict=True))
        weighted = [w / n_terms for w in fisher_product(old_outputs, tangents)]
        grads = th.autograd.grad(outputs, params, grad_outputs=weighted, retain_graph=True, allow_unused=True)
        return flatten([th.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)])

    return product


def gaussian_fisher_product(parameters: Sequence[th.Tensor], tangents: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Fisher of a diagonal Gaussian in (mean, standard deviation): ``diag(1/s^2, 2/s^2)``."""
    _, scale = parameters
    d_mean, d_scale = tangents
    inverse_variance = scale.pow(-2)
    return [d_mean * inverse_variance, 2.0 * d_scale * inverse_variance]


def categorical_fisher_product(parameters: Sequence[th.Tensor], tangents: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Fisher of categoricals in their logits: ``diag(p) - p p^T`` per categorical.

    Several categoricals (a MultiCategorical) are given as several logits tensors.
    """
    products = []
    for logits, d_logits in zip(parameters, tangents, strict=True):
        probs = th.softmax(logits, dim=-1)
        weighted = probs * d_logits
        products.append(weighted - probs * weighted.sum(dim=-1, keepdim=True))
    return products


def bernoulli_fisher_product(parameters: Sequence[th.Tensor], tangents: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Fisher of independent Bernoullis in their logits: ``p (1 - p)``."""
    (logits,) = parameters
    (d_logits,) = tangents
    probs = th.sigmoid(logits)
    return [probs * (1.0 - probs) * d_logits]


@dataclass(frozen=True, kw_only=True)
class LineSearchResult:
    """Outcome of the backtracking line search.

    :param success: whether a step satisfied both conditions
    :param step_fraction: fraction of the maximal step that was accepted (0 on failure)
    :param n_backtracks: number of shrinkings before acceptance (``max_iter`` on failure)
    :param objective: surrogate objective at the returned parameters
    :param kl: KL divergence to the old policy at the returned parameters
    """

    success: bool
    step_fraction: float
    n_backtracks: int
    objective: float
    kl: float


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    restore: Callable[[], None],
    objective_before: float,
    target_kl: float,
    shrinking_factor: float = 0.8,
    max_iter: int = 10,
) -> LineSearchResult:
    """Shrink a step until the KL holds and the surrogate improves.

    Tries the fractions ``1, f, f^2, ...`` of the maximal step. ``evaluate(fraction)``
    moves the parameters to ``old + fraction * step`` and returns ``(objective, kl)``.
    A fraction is accepted when ``kl < target_kl`` and ``objective > objective_before``
    (both finite). When none qualifies, ``restore()`` puts back the exact original
    parameters.
    """
    fraction = 1.0
    for n_backtracks in range(max_iter):
        objective, kl = evaluate(fraction)
        if math.isfinite(objective) and math.isfinite(kl) and kl < target_kl and objective > objective_before:
            return LineSearchResult(
                success=True, step_fraction=fraction, n_backtracks=n_backtracks, objective=objective, kl=kl
            )
        fraction *= shrinking_factor
    restore()
    return no_step(objective_before, n_backtracks=max_iter)


def full_step(
    evaluate: Callable[[float], tuple[float, float]], restore: Callable[[], None], objective_before: float
) -> LineSearchResult:
    """Take the maximal step (fraction 1) whatever it does to the KL and the surrogate, as NPG does.

    Only a step whose objective or KL is not finite is refused: ``restore()`` then puts
    back the exact original parameters.
    """
    objective, kl = evaluate(1.0)
    if not (math.isfinite(objective) and math.isfinite(kl)):
        restore()
        return no_step(objective_before)
    return LineSearchResult(success=True, step_fraction=1.0, n_backtracks=0, objective=objective, kl=kl)


def no_step(objective_before: float, n_backtracks: int = 0) -> LineSearchResult:
    """The outcome when the parameters stay where they were."""
    return LineSearchResult(success=False, step_fraction=0.0, n_backtracks=n_backtracks, objective=objective_before, kl=0.0)
