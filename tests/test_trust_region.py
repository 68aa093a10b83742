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
from tests.helpers import ACTION_SPACES, dense_hessian, observations, small_policy


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
    actor, _ = split_actor_critic(policy)
    with th.no_grad():
        old = copy.copy(policy.get_distribution(obs))
    # The Hessian of the mean KL(pi_old || pi) at pi = pi_old, entry by entry.
    hessian = dense_hessian(policy, actor, lambda: kl_divergence(old, policy.get_distribution(obs)).mean())
    if method == "analytic":
        product = distribution_fisher_vector_product(policy.get_distribution(obs), actor)
        assert product is not None
    else:
        product = kl_hessian_vector_product(kl_divergence(old, policy.get_distribution(obs)).mean(), actor)
    generator = th.Generator().manual_seed(7)
    for _ in range(3):
        v = th.randn(hessian.shape[0], generator=generator, dtype=th.float64)
        assert th.allclose(product(v), hessian @ v, rtol=1e-7, atol=1e-10)


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


@pytest.mark.parametrize(
    ("step", "before", "target_kl", "n_backtracks"),
    [
        # Objective -(v - 1)^2 and KL v^2 / 2 at v = fraction * step; fractions 1, 1/2, 1/4, ...
        (0.05, -1.0, 0.02, 0),  # v = 0.05: KL 0.00125
        (0.3, -1.0, 0.02, 1),  # v = 0.3: KL 0.045 > 0.02; v = 0.15: KL 0.011
        (1.0, -1.0, 0.02, 3),  # the KL allows |v| < 0.2: v = 0.125
        (8.0, -1.0, 0.02, 6),  # v = 8 * 2^-6 = 0.125
        (3.0, -0.81, 5.0, 1),  # the surrogate decides: v = 3 (KL 4.5) scores -4 < -0.81; v = 1.5 scores -0.25
        (-0.5, -1.0, 0.02, None),  # v < 0 always scores below -1: no fraction qualifies
    ],
)
def test_line_search_takes_the_largest_fraction_with_kl_below_target_and_better_surrogate(
    step: float, before: float, target_kl: float, n_backtracks: int | None
) -> None:
    problem = Quadratic(start=0.0, step=step)
    result = backtracking_line_search(
        problem.evaluate, problem.restore, before, target_kl=target_kl, shrinking_factor=0.5, max_iter=8
    )
    if n_backtracks is None:
        assert not result.success
        assert result.step_fraction == 0.0 and result.n_backtracks == 8
        assert problem.value == 0.0
        return
    assert result.success
    assert result.n_backtracks == n_backtracks
    assert result.step_fraction == 0.5**n_backtracks
    assert problem.value == result.step_fraction * step
    assert result.kl == 0.5 * problem.value**2 < target_kl
    assert result.objective == -((problem.value - 1.0) ** 2) > before
    assert len(problem.evaluated) == n_backtracks + 1


class Table:
    """A line search problem given as the (objective, KL) of each fraction tried."""

    def __init__(self, values: dict[float, tuple[float, float]]):
        self.values = values
        self.restored = False

    def evaluate(self, fraction: float) -> tuple[float, float]:
        return self.values[fraction]

    def restore(self) -> None:
        self.restored = True


TARGET_KL = 0.01


@pytest.mark.parametrize(
    ("full_step", "n_backtracks"),
    [
        ((1.0, TARGET_KL * (1 + 1e-6)), 1),  # KL just above the radius: rejected
        ((1.0, TARGET_KL), 1),  # on the radius: rejected (the bound is strict)
        ((1.0, TARGET_KL * (1 - 1e-6)), 0),  # just below: accepted
        ((0.0, TARGET_KL * 0.5), 1),  # no improvement of the surrogate: rejected
        ((1e-9, TARGET_KL * 0.5), 0),  # the smallest improvement: accepted
    ],
    ids=["kl-just-above", "kl-on-boundary", "kl-just-below", "surrogate-equal", "surrogate-just-better"],
)
def test_line_search_decides_at_the_boundary_of_the_trust_region(full_step: tuple[float, float], n_backtracks: int) -> None:
    """The full step (fraction 1) is accepted or rejected by a hair; the next try (0.8) qualifies clearly."""
    problem = Table({1.0: full_step, 0.8: (0.5, 0.5 * TARGET_KL)})
    result = backtracking_line_search(problem.evaluate, problem.restore, 0.0, target_kl=TARGET_KL, shrinking_factor=0.8)
    assert result.success and not problem.restored
    assert result.n_backtracks == n_backtracks
    assert result.step_fraction == (1.0, 0.8)[n_backtracks]
    assert (result.objective, result.kl) == problem.values[result.step_fraction]


def test_line_search_failure_restores_exact_parameters() -> None:
    problem = Quadratic(start=0.25, step=-0.2)  # moves away from the optimum at 1
    result = backtracking_line_search(problem.evaluate, problem.restore, -(0.75**2), target_kl=1.0, max_iter=5)
    assert not result.success
    assert result.n_backtracks == 5
    assert len(problem.evaluated) == 5
    assert problem.value == 0.25


def test_line_search_rejects_non_finite_evaluations() -> None:
    calls = []

    def evaluate(fraction: float) -> tuple[float, float]:
        calls.append(fraction)
        return (float("nan"), 0.0) if fraction > 0.5 else (1.0, 0.001)

    result = backtracking_line_search(evaluate, lambda: None, 0.0, target_kl=0.01, shrinking_factor=0.6)
    assert result.success
    assert result.step_fraction == pytest.approx(0.36)
