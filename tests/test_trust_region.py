"""The trust-region mathematics against dense linear algebra and closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch as th
from stable_baselines3.common.distributions import kl_divergence

from sb3_trpo.common.distributions import distribution_fisher_vector_product
from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.trust_region import (
    backtracking_line_search,
    conjugate_gradient,
    damped,
    kl_hessian_vector_product,
    max_step_size,
)
from tests.helpers import ACTION_SPACES, dense_kl_hessian, observations, small_policy


def random_spd(n: int, seed: int, condition: float = 50.0) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(n, n, generator=generator, dtype=th.float64))
    eigenvalues = th.logspace(0, math.log10(condition), n, dtype=th.float64)
    return q @ th.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conjugate_gradient_solves_spd_system_to_tolerance(seed: int) -> None:
    a = random_spd(12, seed)
    b = th.randn(12, generator=th.Generator().manual_seed(seed + 10), dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=100, residual_tol=1e-20)
    exact = th.linalg.solve(a, b)
    assert th.allclose(result.solution, exact, rtol=1e-8, atol=1e-10)
    true_residual = float(th.linalg.norm(b - a @ result.solution))
    assert result.residual_norm < 1e-9
    assert true_residual < 1e-8
    # In exact arithmetic CG terminates in at most n iterations.
    assert result.n_iterations <= 14


def test_conjugate_gradient_respects_max_iter_and_reports_residual() -> None:
    a = random_spd(30, 3, condition=1e4)
    b = th.ones(30, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=3, residual_tol=0.0)
    assert result.n_iterations == 3
    true_residual = float(th.linalg.norm(b - a @ result.solution))
    assert result.residual_norm == pytest.approx(true_residual, rel=1e-6)
    assert result.residual_norm > 1e-3


def test_conjugate_gradient_stops_at_residual_tolerance() -> None:
    a = random_spd(40, 4, condition=5.0)
    b = th.ones(40, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=100, residual_tol=1e-4)
    assert result.residual_norm**2 < 1e-4
    assert result.n_iterations < 20
    one_less = conjugate_gradient(lambda v: a @ v, b, max_iter=result.n_iterations - 1, residual_tol=1e-4)
    assert one_less.residual_norm**2 >= 1e-4


def test_conjugate_gradient_zero_right_hand_side_returns_zero() -> None:
    result = conjugate_gradient(lambda v: 2 * v, th.zeros(5), max_iter=10)
    assert result.n_iterations == 0
    assert th.equal(result.solution, th.zeros(5))


def test_max_step_puts_quadratic_kl_on_boundary() -> None:
    a = random_spd(6, 5)
    s = th.randn(6, generator=th.Generator().manual_seed(6), dtype=th.float64)
    beta = max_step_size(s, a @ s, target_kl=0.01)
    step = beta * s
    assert 0.5 * float(step @ a @ step) == pytest.approx(0.01, rel=1e-12)
    assert max_step_size(s, -a @ s, target_kl=0.01) == 0.0


@pytest.mark.parametrize("shared_extractor", [False, True], ids=["separate", "shared-extractor"])
@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
@pytest.mark.parametrize("method", ["analytic", "double_backprop"])
def test_fisher_vector_product_equals_dense_kl_hessian(kind: str, method: str, shared_extractor: bool) -> None:
    policy = small_policy(kind, shared_extractor=shared_extractor)
    obs = observations()
    hessian = dense_kl_hessian(policy, obs)
    actor, _ = split_actor_critic(policy)
    if method == "analytic":
        product = distribution_fisher_vector_product(policy.get_distribution(obs), actor)
        assert product is not None
    else:
        with th.no_grad():
            old = copy.copy(policy.get_distribution(obs))
        new = policy.get_distribution(obs)
        product = kl_hessian_vector_product(kl_divergence(old, new).mean(), actor)
    generator = th.Generator().manual_seed(7)
    for _ in range(3):
        v = th.randn(hessian.shape[0], generator=generator, dtype=th.float64)
        assert th.allclose(product(v), hessian @ v, rtol=1e-7, atol=1e-10)
    # The product leaves the policy's own parameters in place.
    assert all(any(p is a for a in actor) for p in split_actor_critic(policy)[0])
    assert all(isinstance(p, th.nn.Parameter) for p in policy.parameters())
    assert float(th.linalg.eigvalsh(hessian).min()) > -1e-10


def test_damping_adds_multiple_of_identity() -> None:
    a = random_spd(4, 8)
    v = th.arange(4, dtype=th.float64)
    assert th.allclose(damped(lambda x: a @ x, 0.1)(v), (a + 0.1 * th.eye(4, dtype=th.float64)) @ v)


class Quadratic:
    """A parameter and a surrogate/KL pair on which the line search can be checked."""

    def __init__(self, start: float, step: float):
        self.start = start
        self.step = step
        self.value = start
        self.evaluated: list[tuple[float, float, float]] = []

    def evaluate(self, fraction: float) -> tuple[float, float]:
        self.value = self.start + fraction * self.step
        objective = -((self.value - 1.0) ** 2)
        kl = 0.5 * (self.value - self.start) ** 2
        self.evaluated.append((fraction, objective, kl))
        return objective, kl

    def restore(self) -> None:
        self.value = self.start


@pytest.mark.parametrize("step", [0.05, 0.3, 1.0, 2.5, 8.0, -0.5])
def test_line_search_never_accepts_kl_violation_or_worse_surrogate(step: float) -> None:
    problem = Quadratic(start=0.0, step=step)
    before = -1.0
    result = backtracking_line_search(
        problem.evaluate, problem.restore, before, target_kl=0.02, shrinking_factor=0.5, max_iter=8
    )
    if result.success:
        assert result.kl < 0.02
        assert result.objective > before
        assert problem.value == pytest.approx(result.step_fraction * step)
        # Every larger fraction tried before was rejected for a reason.
        for fraction, objective, kl in problem.evaluated[:-1]:
            assert fraction > result.step_fraction
            assert kl >= 0.02 or objective <= before
    else:
        assert problem.value == 0.0
        assert result.step_fraction == 0.0


def test_line_search_failure_restores_exact_parameters() -> None:
    problem = Quadratic(start=0.25, step=-0.2)  # moves away from the optimum at 1
    result = backtracking_line_search(problem.evaluate, problem.restore, -(0.75**2), target_kl=1.0, max_iter=5)
    assert not result.success
    assert result.n_backtracks == 5
    assert len(problem.evaluated) == 5
    assert problem.value == 0.25


def test_line_search_takes_full_step_when_it_qualifies() -> None:
    problem = Quadratic(start=0.0, step=0.1)
    result = backtracking_line_search(problem.evaluate, problem.restore, -1.0, target_kl=0.01)
    assert result.success and result.step_fraction == 1.0 and result.n_backtracks == 0


def test_line_search_rejects_non_finite_evaluations() -> None:
    calls = []

    def evaluate(fraction: float) -> tuple[float, float]:
        calls.append(fraction)
        return (float("nan"), 0.0) if fraction > 0.5 else (1.0, 0.001)

    result = backtracking_line_search(evaluate, lambda: None, 0.0, target_kl=0.01, shrinking_factor=0.6)
    assert result.success
    assert result.step_fraction == pytest.approx(0.36)
