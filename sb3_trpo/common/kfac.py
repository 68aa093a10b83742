"""Kronecker-factored approximate curvature (K-FAC) of a network's Fisher information.

For a layer ``s = W a + b`` write ``ā = [a; 1]`` and ``W̄ = [W b]``. The gradient of a
log-likelihood with respect to ``W̄`` is ``g ā^T`` with ``g = ∂ log p / ∂ s`` (the
pre-activation gradient), so the layer's Fisher block is ``E[ā ā^T ⊗ g g^T]``
(``vec`` stacks columns). K-FAC (Martens & Grosse 2015) takes inputs and pre-activation
gradients as independent:

    F_layer ≈ A ⊗ G,    A = E[ā ā^T],    G = E[g g^T],

and the whole Fisher as block-diagonal over layers. Then ``(A ⊗ G)^-1 vec(V) =
vec(G^-1 V A^-1)``: a natural-gradient step costs two small inverses per layer. For
``nn.Conv2d`` (Grosse & Martens 2016, KFC) ``ā`` is a patch of the input (``F.unfold``)
with a 1 appended, and under their "spatially uncorrelated derivatives" approximation
``A`` averages ``ā ā^T`` over samples and locations while ``G`` sums ``g g^T`` over
locations and averages over samples. A ``nn.Linear`` applied to inputs with extra leading
dimensions is treated the same way, its positions taking the place of locations.

``g`` must come from targets sampled from the model's own distribution: that gives the
Fisher (the expected Hessian of the KL), not the "empirical Fisher" of the observed targets.

These are functions of tensors and one small state class; the algorithm composes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch as th
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

KFAC_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def kfac_layers(module: nn.Module, parameters: list[nn.Parameter]) -> dict[str, nn.Linear | nn.Conv2d]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``module`` whose weight is one of ``parameters``, by name.

    :raises ValueError: for a layer K-FAC does not cover (a grouped convolution, a padding
        mode other than zeros) or whose weight and bias are not both in ``parameters``
    """
    ids = {id(p) for p in parameters}
    layers: dict[str, nn.Linear | nn.Conv2d] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, KFAC_LAYER_TYPES) or id(layer.weight) not in ids:
            continue
        if isinstance(layer, nn.Conv2d) and (
            layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)
        ):
            raise ValueError(
                f"K-FAC covers nn.Conv2d with groups=1, padding_mode='zeros' and numeric padding; layer {name!r} is not"
            )
        if layer.bias is not None and id(layer.bias) not in ids:
            raise ValueError(f"the weight and bias of layer {name!r} must be moved together")
        layers[name] = layer
    return layers


def uncovered_parameters(layers: Mapping[str, nn.Module], parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    """The ``parameters`` that belong to none of ``layers``."""
    covered = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}
    return [p for p in parameters if id(p) not in covered]


# ------------------------------------------------------------------ capture
class LayerCapture:
    """The inputs and outputs of ``layers`` in the forward passes run inside this context.

    A forward hook records each call's input (detached) and output; the layer passes a
    copy of its output on, so that an in-place operation after the layer leaves the
    recorded output, whose gradient :func:`batch_factors` takes, as the layer computed it.
    The hooks are removed on exit.
    """

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self.inputs: dict[str, list[th.Tensor]] = {name: [] for name in self.layers}
        self.outputs: dict[str, list[th.Tensor]] = {name: [] for name in self.layers}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[th.Tensor, ...], th.Tensor], th.Tensor]:
        def hook(module: nn.Module, args: tuple[th.Tensor, ...], output: th.Tensor) -> th.Tensor:
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(output)
            return output.clone()

        return hook


def input_rows(layer: nn.Module, inputs: th.Tensor) -> th.Tensor:
    """The rows ``ā`` of a layer's input: one per sample and location, a 1 appended when it has a bias.

    For ``nn.Conv2d`` a row is the flattened patch the kernel sees (``F.unfold``), in the
    order of ``weight.reshape(out_channels, -1)``.
    """
    if isinstance(layer, nn.Conv2d):
        assert not isinstance(layer.padding, str), "kfac_layers refuses padding given by name"
        patches = F.unfold(inputs, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])
    if layer.bias is not None:
        rows = th.cat([rows, th.ones_like(rows[:, :1])], dim=1)
    return rows


def output_rows(layer: nn.Module, output_grads: th.Tensor) -> th.Tensor:
    """The rows ``g`` of the pre-activation gradients: one per sample and location."""
    if isinstance(layer, nn.Conv2d):
        return output_grads.permute(0, 2, 3, 1).reshape(-1, output_grads.shape[1])
    return output_grads.reshape(-1, output_grads.shape[-1])


def batch_factors(
    capture: LayerCapture, log_likelihood: th.Tensor, n_samples: int, scale: float = 1.0
) -> dict[str, tuple[th.Tensor, th.Tensor]]:
    """The factors ``(A, G)`` of each captured layer on one batch.

    ``A = Σ ā ā^T / (rows of ā)`` and ``G = scale * Σ g g^T / n_samples`` with ``g`` the
    gradient of ``log_likelihood`` (the sum over samples of the log-likelihood of targets
    drawn from the model) with respect to the layer's output: for a plain ``nn.Linear``
    these are the means over samples; for a convolution ``G`` sums over locations (see the
    module docstring). ``scale`` multiplies the Fisher (e.g. by 1 / KL terms per sample).
    The graph of ``log_likelihood`` is kept.
    """
    names = [name for name, outputs in capture.outputs.items() for _ in outputs]
    outputs = [output for outputs in capture.outputs.values() for output in outputs]
    grads = th.autograd.grad(log_likelihood, outputs, retain_graph=True, allow_unused=True)
    a_rows: dict[str, list[th.Tensor]] = {name: [] for name in capture.layers}
    g_rows: dict[str, list[th.Tensor]] = {name: [] for name in capture.layers}
    inputs = [tensor for tensors in capture.inputs.values() for tensor in tensors]
    for name, inp, output, grad in zip(names, inputs, outputs, grads, strict=True):
        layer = capture.layers[name]
        a_rows[name].append(input_rows(layer, inp))
        g_rows[name].append(output_rows(layer, th.zeros_like(output) if grad is None else grad.detach()))
    factors = {}
    for name in capture.layers:
        if not a_rows[name]:
            continue
        a = th.cat(a_rows[name])
        g = th.cat(g_rows[name])
        factors[name] = (a.T @ a / len(a), scale * (g.T @ g) / n_samples)
    return factors


# ------------------------------------------------------------------ parameters as matrices
def layer_matrix(layer: nn.Module, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:
    """``W̄ = [W b]`` (``out x in(+1)``) of a weight-shaped and a bias-shaped tensor (gradients or steps)."""
    matrix = weight.reshape(weight.shape[0], -1)
    return matrix if bias is None else th.cat([matrix, bias.reshape(-1, 1)], dim=1)


def split_layer_matrix(layer: nn.Linear | nn.Conv2d, matrix: th.Tensor) -> list[th.Tensor]:
    """The weight-shaped (and bias-shaped) parts of ``W̄``, in ``layer.parameters()`` order."""
    if layer.bias is None:
        return [matrix.reshape(layer.weight.shape)]
    return [matrix[:, :-1].reshape(layer.weight.shape), matrix[:, -1].reshape(layer.bias.shape)]


# ------------------------------------------------------------------ damping, inverses, the step
def pi_damping(a: th.Tensor, g: th.Tensor) -> float:
    """Martens & Grosse (2015, sec. 6.3): ``pi = sqrt((tr(A) / dim A) / (tr(G) / dim G))``.

    Factored Tikhonov damping adds ``pi * sqrt(lambda) I`` to ``A`` and ``sqrt(lambda) / pi I``
    to ``G``, so that ``(A + pi c I) ⊗ (G + c / pi I) = A ⊗ G + c^2 I + (c / pi) A ⊗ I + pi c I ⊗ G``
    (``c = sqrt(lambda)``). This ``pi`` makes the traces of the last two terms equal, which
    minimises the trace of their sum. Where a trace is zero ``pi`` is 1.
    """
    a_mean = float(th.trace(a)) / a.shape[0]
    g_mean = float(th.trace(g)) / g.shape[0]
    if a_mean <= 0.0 or g_mean <= 0.0:
        return 1.0
    return math.sqrt(a_mean / g_mean)


def damped_inverse(factor: th.Tensor, damping: float) -> tuple[th.Tensor, float]:
    """``(factor + damping I)^-1`` by eigendecomposition, and the damped factor's condition number.

    Eigenvalues below zero (rounding of a positive semi-definite factor) count as zero.
    """
    eigenvalues, eigenvectors = th.linalg.eigh(factor)
    damped = eigenvalues.clamp_min(0.0) + damping
    inverse = (eigenvectors / damped) @ eigenvectors.T
    return inverse, float(damped.max() / damped.min())


def step_scale(quadratic: float, target_kl: float, max_lr: float) -> float:
    """``min(max_lr, sqrt(2 target_kl / s^T F s))``: the largest step size up to ``max_lr`` whose
    model KL ``0.5 eta^2 s^T F s`` is at most ``target_kl``.

    A step with ``s^T F s`` zero (no gradient) gets ``max_lr``.
    """
    if quadratic <= 0.0:
        return max_lr
    return min(max_lr, math.sqrt(2.0 * target_kl / quadratic))


def gaussian_log_std_natural_step(gradient: th.Tensor, scale: float = 1.0) -> th.Tensor:
    """The exact natural step of a diagonal Gaussian's state-independent ``log_std``.

    With ``a = mu + sigma * eps``, ``∂ log p / ∂ log sigma_i = eps_i^2 - 1`` has
    ``E[(eps_i^2 - 1)(eps_j^2 - 1)] = 2`` for ``i = j`` and 0 otherwise, and its products with
    the mean's score ``eps_j / sigma_j`` have zero expectation (odd moments): the Fisher block
    of ``log_std`` is ``2 I`` per state, uncoupled from every other parameter. Averaged over
    states it stays ``2 I`` (times ``scale``), so the natural step is ``gradient / (2 scale)``.
    """
    return gradient / (2.0 * scale)


@dataclass
class LayerState:
    """One layer's running factors and the damped inverses taken at the last refresh."""

    a: th.Tensor
    g: th.Tensor
    a_inverse: th.Tensor | None = None
    g_inverse: th.Tensor | None = None
    condition_a: float = 1.0
    condition_g: float = 1.0


@dataclass
class KroneckerFactors:
    """Running Kronecker factors of a set of layers (by name) and their damped inverses.

    :param decay: weight of the old factors in the running average ``decay * old + (1 - decay) * batch``
        (the first batch is taken as it is)
    :param damping: Tikhonov damping ``lambda``, split between the factors by :func:`pi_damping`
    :param inverse_interval: the inverses are recomputed on every ``inverse_interval``-th
        update of the factors (and on the first)
    """

    decay: float
    damping: float
    inverse_interval: int
    layers: dict[str, LayerState] = field(default_factory=dict)
    n_updates: int = 0

    def update(self, factors: Mapping[str, tuple[th.Tensor, th.Tensor]]) -> None:
        """Fold one batch's factors into the running averages, and refresh the inverses when due."""
        for name, (a, g) in factors.items():
            state = self.layers.get(name)
            if state is None:
                self.layers[name] = LayerState(a.clone(), g.clone())
            else:
                state.a.mul_(self.decay).add_(a, alpha=1.0 - self.decay)
                state.g.mul_(self.decay).add_(g, alpha=1.0 - self.decay)
        if self.n_updates % self.inverse_interval == 0:
            self.refresh_inverses()
        self.n_updates += 1

    def refresh_inverses(self) -> None:
        """``(A + pi sqrt(lambda) I)^-1`` and ``(G + sqrt(lambda) / pi I)^-1`` of every layer's current factors."""
        root = math.sqrt(self.damping)
        for state in self.layers.values():
            pi = pi_damping(state.a, state.g)
            state.a_inverse, state.condition_a = damped_inverse(state.a, pi * root)
            state.g_inverse, state.condition_g = damped_inverse(state.g, root / pi)

    def natural_step(self, gradients: Mapping[str, th.Tensor]) -> dict[str, th.Tensor]:
        """``G_damped^-1 V A_damped^-1`` of each layer's gradient matrix ``V`` (see :func:`layer_matrix`)."""
        steps = {}
        for name, gradient in gradients.items():
            state = self.layers[name]
            assert state.a_inverse is not None and state.g_inverse is not None, "update() refreshes the inverses first"
            steps[name] = state.g_inverse @ gradient @ state.a_inverse
        return steps

    def quadratic(self, steps: Mapping[str, th.Tensor]) -> float:
        """``Σ_layers vec(V)^T (A ⊗ G) vec(V) = Σ tr(V^T G V A)`` with the current (undamped) factors."""
        total = 0.0
        for name, step in steps.items():
            state = self.layers[name]
            total += float((state.g @ step @ state.a * step).sum())
        return total

    def condition_numbers(self) -> tuple[float, float]:
        """The largest condition number of a damped ``A`` and of a damped ``G`` over the layers."""
        if not self.layers:
            return 1.0, 1.0
        return max(s.condition_a for s in self.layers.values()), max(s.condition_g for s in self.layers.values())

    def to(self, device: th.device) -> KroneckerFactors:
        """Move every tensor to ``device`` (for a model loaded onto another device)."""
        for state in self.layers.values():
            for name in ("a", "g", "a_inverse", "g_inverse"):
                tensor = getattr(state, name)
                if tensor is not None:
                    setattr(state, name, tensor.to(device))
        return self


def layer_gradients(
    layers: Mapping[str, nn.Linear | nn.Conv2d], gradients: Mapping[int, th.Tensor]
) -> Iterator[tuple[str, th.Tensor]]:
    """Each layer's gradient matrix ``[∇W ∇b]`` from the gradients keyed by ``id(parameter)``."""
    for name, layer in layers.items():
        bias = None if layer.bias is None else gradients[id(layer.bias)]
        yield name, layer_matrix(layer, gradients[id(layer.weight)], bias)
