"""K-FAC (sb3_trpo.common.kfac) against dense Fisher blocks built with autograd, closed forms and dense solves."""

from __future__ import annotations

import math

import pytest
import torch as th
from torch import nn
from torch.distributions import Categorical, Normal

from sb3_trpo.common.kfac import (
    KroneckerFactors,
    LayerCapture,
    batch_factors,
    damped_inverse,
    gaussian_log_std_natural_step,
    input_rows,
    kfac_layers,
    layer_matrix,
    pi_damping,
    split_layer_matrix,
    step_scale,
    uncovered_parameters,
)


def vec(matrix: th.Tensor) -> th.Tensor:
    """Column-stacking ``vec``, the order in which ``(A ⊗ G) vec(V) = vec(G V A)``."""
    return matrix.T.reshape(-1)


def dense_fisher_block(layer: nn.Module, log_likelihoods: th.Tensor) -> th.Tensor:
    """``mean_n vec(∇_W̄ log p_n) vec(∇_W̄ log p_n)^T`` from one autograd gradient per sample."""
    rows = []
    for log_p in log_likelihoods:
        weight, bias = th.autograd.grad(log_p, [layer.weight, layer.bias], retain_graph=True)
        rows.append(vec(layer_matrix(layer, weight, bias)))
    grads = th.stack(rows)
    return grads.T @ grads / len(grads)


def kfac_block(layer: nn.Module, make_log_likelihoods, inputs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """``A ⊗ G`` from :func:`batch_factors` and the dense block, on the same forward pass and targets."""
    with LayerCapture({"layer": layer}) as capture:
        log_likelihoods = make_log_likelihoods(layer(inputs))
    ((a, g),) = batch_factors(capture, log_likelihoods.sum(), n_samples=len(inputs)).values()
    return th.kron(a, g), dense_fisher_block(layer, log_likelihoods)


def relative_error(approximation: th.Tensor, exact: th.Tensor) -> float:
    return float((approximation - exact).norm() / exact.norm())


def factorial(inputs: th.Tensor, noises: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Every input paired with every noise: an empirical distribution under which the two are independent."""
    return inputs.repeat_interleave(len(noises), dim=0), noises.repeat(len(inputs), 1)


def test_gaussian_layer_factors_equal_the_dense_fisher_block() -> None:
    # The score of a Gaussian mean, (a - mu) / sigma^2 = eps / sigma, does not depend on the
    # input: over every (input, noise) pair the expectation factorises exactly.
    th.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    sigma = th.tensor([0.5, 2.0], dtype=th.float64)
    inputs, noises = factorial(th.randn(5, 3, dtype=th.float64), th.randn(4, 2, dtype=th.float64))

    def log_likelihoods(mean: th.Tensor) -> th.Tensor:
        actions = (mean + sigma * noises).detach()
        return Normal(mean, sigma).log_prob(actions).sum(-1)

    kfac, dense = kfac_block(layer, log_likelihoods, inputs)
    assert th.allclose(kfac, dense, rtol=1e-10, atol=1e-12)


def test_categorical_layer_factors_exact_when_independent_and_report_the_error_otherwise() -> None:
    th.manual_seed(1)
    layer = nn.Linear(3, 4).double()
    inputs = th.randn(6, 3, dtype=th.float64)
    choices = th.arange(4).repeat(len(inputs))
    inputs = inputs.repeat_interleave(4, dim=0)

    def log_likelihoods(logits: th.Tensor) -> th.Tensor:
        return Categorical(logits=logits).log_prob(choices)

    # Zero weights: the same probabilities for every input, so the score onehot - p does not depend on it.
    with th.no_grad():
        layer.weight.zero_()
    kfac, dense = kfac_block(layer, log_likelihoods, inputs)
    assert th.allclose(kfac, dense, rtol=1e-10, atol=1e-12)

    with th.no_grad():
        layer.weight.normal_()
    kfac, dense = kfac_block(layer, log_likelihoods, inputs)
    error = relative_error(kfac, dense)
    print(f"categorical layer, input-dependent probabilities: K-FAC block relative error {error:.3f}")
    assert error > 1e-3


def test_hidden_layer_block_approximation_error_is_reported() -> None:
    th.manual_seed(2)
    hidden, head = nn.Linear(3, 5).double(), nn.Linear(5, 2).double()
    inputs = th.randn(400, 3, dtype=th.float64)
    noises = th.randn(400, 2, dtype=th.float64)

    def log_likelihoods(pre_activation: th.Tensor) -> th.Tensor:
        mean = head(th.tanh(pre_activation))
        return Normal(mean, 1.0).log_prob((mean + noises).detach()).sum(-1)

    kfac, dense = kfac_block(hidden, log_likelihoods, inputs)
    error = relative_error(kfac, dense)
    print(f"hidden tanh layer of a Gaussian policy: K-FAC block relative error {error:.3f}")
    assert error < 1.0


def test_convolution_patches_reproduce_the_layer() -> None:
    th.manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1).double()
    inputs = th.randn(4, 2, 7, 6, dtype=th.float64)
    rows = input_rows(conv, inputs)
    weight = layer_matrix(conv, conv.weight, conv.bias)
    expected = conv(inputs).permute(0, 2, 3, 1).reshape(-1, 3)
    assert th.allclose(rows @ weight.T, expected)
    restored = split_layer_matrix(conv, weight)
    assert th.equal(restored[0], conv.weight) and th.equal(restored[1], conv.bias)


def test_convolution_with_one_location_has_the_factors_of_the_linear_layer() -> None:
    th.manual_seed(4)
    conv = nn.Conv2d(2, 3, kernel_size=(2, 3)).double()
    linear = nn.Linear(12, 3).double()
    with th.no_grad():
        linear.weight.copy_(conv.weight.reshape(3, -1))
        linear.bias.copy_(conv.bias)
    inputs = th.randn(6, 2, 2, 3, dtype=th.float64)
    noises = th.randn(6, 3, dtype=th.float64)

    def factors(layer: nn.Module, x: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        with LayerCapture({"layer": layer}) as capture:
            mean = layer(x).reshape(6, 3)
            log_p = Normal(mean, 1.0).log_prob((mean + noises).detach()).sum()
        return batch_factors(capture, log_p, n_samples=6)["layer"]

    for conv_factor, linear_factor in zip(factors(conv, inputs), factors(linear, inputs.reshape(6, -1)), strict=True):
        assert th.allclose(conv_factor, linear_factor)


def test_convolution_factors_sum_the_gradient_factor_over_locations() -> None:
    # KFC: the block is |T| * mean(ā ā^T) ⊗ mean(g g^T) over samples and locations; report its error.
    th.manual_seed(5)
    conv = nn.Conv2d(1, 2, kernel_size=2).double()
    inputs = th.randn(300, 1, 3, 3, dtype=th.float64)
    noises = th.randn(300, 2, 2, 2, dtype=th.float64)

    def log_likelihoods(mean: th.Tensor) -> th.Tensor:
        return Normal(mean, 1.0).log_prob((mean + noises).detach()).sum((1, 2, 3))

    kfac, dense = kfac_block(conv, log_likelihoods, inputs)
    error = relative_error(kfac, dense)
    print(f"convolution, 4 locations: KFC block relative error {error:.3f}")
    # Summing g g^T over the 4 locations (not averaging) keeps the diagonal's scale right.
    assert abs(float(kfac.trace() / dense.trace()) - 1.0) < 0.15
    assert error < 0.5


def test_pi_damping_balances_the_traces_of_the_extra_terms() -> None:
    th.manual_seed(6)
    a = th.randn(4, 4, dtype=th.float64)
    a = a @ a.T
    g = th.randn(3, 3, dtype=th.float64)
    g = 0.01 * g @ g.T
    pi = pi_damping(a, g)
    assert pi == pytest.approx(math.sqrt((a.trace() / 4) / (g.trace() / 3)), rel=1e-12)
    c = 0.3
    extra_a = th.kron(a, th.eye(3, dtype=th.float64)) * c / pi
    extra_g = th.kron(th.eye(4, dtype=th.float64), g) * c * pi
    assert extra_a.trace() == pytest.approx(float(extra_g.trace()), rel=1e-12)
    damped = th.kron(a + pi * c * th.eye(4, dtype=th.float64), g + c / pi * th.eye(3, dtype=th.float64))
    expected = th.kron(a, g) + c**2 * th.eye(12, dtype=th.float64) + extra_a + extra_g
    assert th.allclose(damped, expected)
    assert pi_damping(a, th.zeros(3, 3)) == 1.0


def test_damped_inverse_solves_the_damped_factor() -> None:
    th.manual_seed(7)
    m = th.randn(5, 3, dtype=th.float64)
    factor = m @ m.T  # rank 3: only the damping makes it invertible
    inverse, condition = damped_inverse(factor, 0.1)
    rhs = th.randn(5, 2, dtype=th.float64)
    damped = factor + 0.1 * th.eye(5, dtype=th.float64)
    assert th.allclose(inverse @ rhs, th.linalg.solve(damped, rhs))
    assert condition == pytest.approx(float(th.linalg.cond(damped)), rel=1e-9)


def fitted_factors(
    decay: float = 0.9, damping: float = 0.05, interval: int = 1
) -> tuple[KroneckerFactors, th.Tensor, th.Tensor]:
    th.manual_seed(8)
    x, y = th.randn(20, 4, dtype=th.float64), th.randn(20, 3, dtype=th.float64)
    a, g = x.T @ x / 20, y.T @ y / 20
    state = KroneckerFactors(decay=decay, damping=damping, inverse_interval=interval)
    state.update({"layer": (a, g)})
    return state, a, g


def test_natural_step_solves_the_damped_kronecker_fisher() -> None:
    state, a, g = fitted_factors()
    pi, c = pi_damping(a, g), math.sqrt(0.05)
    damped = th.kron(a + pi * c * th.eye(4, dtype=th.float64), g + c / pi * th.eye(3, dtype=th.float64))
    gradient = th.randn(3, 4, dtype=th.float64)
    step = state.natural_step({"layer": gradient})["layer"]
    assert th.allclose(vec(step), th.linalg.solve(damped, vec(gradient)))


def test_quadratic_is_the_kronecker_fisher_form() -> None:
    state, a, g = fitted_factors()
    step = th.randn(3, 4, dtype=th.float64)
    assert state.quadratic({"layer": step}) == pytest.approx(float(vec(step) @ th.kron(a, g) @ vec(step)), rel=1e-12)


def test_running_average_and_inverse_refresh_interval() -> None:
    state, a, g = fitted_factors(decay=0.75, interval=2)
    first_inverse = state.layers["layer"].a_inverse.clone()
    state.update({"layer": (2 * a, 3 * g)})
    layer = state.layers["layer"]
    assert th.allclose(layer.a, 0.75 * a + 0.25 * 2 * a) and th.allclose(layer.g, 0.75 * g + 0.25 * 3 * g)
    assert th.equal(layer.a_inverse, first_inverse)  # the second update is not a refresh
    state.update({"layer": (a, g)})
    assert not th.equal(layer.a_inverse, first_inverse)
    pi = pi_damping(layer.a, layer.g)
    expected, _ = damped_inverse(layer.a, pi * math.sqrt(0.05))
    assert th.allclose(layer.a_inverse, expected)


def test_unclipped_step_has_model_kl_target_kl() -> None:
    state, _, _ = fitted_factors()
    step = state.natural_step({"layer": th.randn(3, 4, dtype=th.float64)})
    quadratic = state.quadratic(step)
    eta = step_scale(quadratic, target_kl=0.01, max_lr=1e6)
    scaled = {name: eta * s for name, s in step.items()}
    assert 0.5 * state.quadratic(scaled) == pytest.approx(0.01, rel=1e-10)
    assert step_scale(quadratic, target_kl=0.01, max_lr=eta / 2) == eta / 2
    assert step_scale(0.0, target_kl=0.01, max_lr=0.3) == 0.3


def test_log_std_fisher_block_is_two_per_state_and_uncoupled() -> None:
    # The Hessian of KL(old || new) at new = old is the Fisher, exactly.
    mean, log_std = th.tensor([0.3, -1.0], dtype=th.float64), th.tensor([-0.5, 0.7], dtype=th.float64)

    def kl(parameters: th.Tensor) -> th.Tensor:
        new = Normal(parameters[:2], parameters[2:].exp())
        return th.distributions.kl_divergence(Normal(mean, log_std.exp()), new).sum()

    fisher = th.autograd.functional.hessian(kl, th.cat([mean, log_std]))
    assert th.allclose(fisher[2:, 2:], 2 * th.eye(2, dtype=th.float64))
    assert th.allclose(fisher[:2, 2:], th.zeros(2, 2, dtype=th.float64))
    gradient = th.tensor([0.4, -2.0], dtype=th.float64)
    scale = 0.5
    expected = th.linalg.solve(scale * fisher[2:, 2:], gradient)
    assert th.allclose(gaussian_log_std_natural_step(gradient, scale), expected)


def test_layers_found_by_parameter_and_the_rest_reported() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    log_std = nn.Parameter(th.zeros(1))
    parameters = [*net.parameters(), log_std]
    layers = kfac_layers(net, parameters)
    assert list(layers) == ["0", "2"]
    assert uncovered_parameters(layers, parameters) == [log_std]
    assert list(kfac_layers(net, list(net[2].parameters()))) == ["2"]
    with pytest.raises(ValueError, match="groups=1, padding_mode='zeros' and numeric padding"):
        grouped = nn.Conv2d(2, 2, 3, groups=2)
        kfac_layers(grouped, list(grouped.parameters()))
    with pytest.raises(ValueError, match="weight and bias"):
        kfac_layers(net, [net[0].weight])


def test_damped_inverse_counts_negative_rounding_as_zero() -> None:
    factor = th.diag(th.tensor([-1e-3, 2.0], dtype=th.float64))
    inverse, condition = damped_inverse(factor, 1e-3)
    assert th.allclose(inverse, th.diag(th.tensor([1e3, 1 / (2.0 + 1e-3)], dtype=th.float64)))
    assert condition == pytest.approx((2.0 + 1e-3) / 1e-3)
