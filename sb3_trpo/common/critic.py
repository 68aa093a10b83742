"""The critic's regression: minibatch Adam steps of the value function on the rollout's returns.

Pure fitting, wherever it runs: :func:`fit_critic` computes one fit (a :class:`CriticJob`) on
the policy's critic and its optimizer, and can stop between two minibatches (:class:`FitStopped`)
and be continued by another process sharing the weights and the optimizer state, with the same
numbers as one uninterrupted fit. Where a fit runs is decided by
:class:`~sb3_trpo.common.critic_fitter.CriticFitter`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo.common.validation import NonFiniteError

# The optimizers whose state layout the package knows (SB3's default and its decoupled variant).
ADAM_OPTIMIZERS = (th.optim.Adam, th.optim.AdamW)


def index_observations(observations: PyTorchObs, index: th.Tensor | slice) -> PyTorchObs:
    """Select rows of a tensor or of every tensor of a dict observation."""
    if isinstance(observations, dict):
        return {key: _rows(value, index) for key, value in observations.items()}
    return _rows(observations, index)


def _rows(tensor: th.Tensor, index: th.Tensor | slice) -> th.Tensor:
    # The same copy of the same rows as indexing, which takes torch's general advanced-indexing path.
    if isinstance(index, th.Tensor) and index.dim() == 1 and not index.is_floating_point() and index.dtype != th.bool:
        return tensor.index_select(0, index)
    return tensor[index]


def prefer_fused_adam(optimizer: th.optim.Optimizer) -> None:
    """Run SB3's default Adam with PyTorch's fused kernel: the same update in one call instead of one per tensor.

    Parameter groups where the user set ``fused`` or ``foreach`` (through
    ``policy_kwargs["optimizer_kwargs"]``) are left as they are.
    """
    if type(optimizer) not in ADAM_OPTIMIZERS:
        return
    for group in optimizer.param_groups:
        if group.get("fused") is None and not group.get("foreach") and not group.get("differentiable"):
            group["fused"] = True
            # State made by the unfused kernel (an sb3-contrib model, a loaded optimizer) keeps
            # its step counters on the CPU, where the fused CUDA kernel cannot read them.
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=param.device, dtype=th.float32)


@dataclass
class CriticJob:
    """One critic fit: the rollout's observations and returns, and the minibatch order of every epoch."""

    observations: np.ndarray | dict[str, np.ndarray]
    returns: np.ndarray
    permutations: np.ndarray  # (epochs, samples)
    batch_size: int
    learning_rate: float

    @classmethod
    def from_rollout(cls, buffer: RolloutBuffer, epochs: int, batch_size: int, learning_rate: float) -> CriticJob:
        """A fit on the buffer's returns, minibatches drawn as sb3-contrib's ``buffer.get(batch_size)``, epoch by epoch."""
        n_samples = buffer.buffer_size * buffer.n_envs
        permutations = np.array([np.random.permutation(n_samples) for _ in range(epochs)], dtype=np.int64)
        return cls(
            observations=buffer.observations,
            returns=buffer.returns.flatten(),
            permutations=permutations.reshape(-1, n_samples),
            batch_size=batch_size,
            learning_rate=learning_rate,
        )


def _as_tensors(observations: np.ndarray | dict[str, np.ndarray], device: th.device) -> PyTorchObs:
    if isinstance(observations, dict):
        return {key: th.as_tensor(value, device=device) for key, value in observations.items()}
    return th.as_tensor(observations, device=device)


class CriticSnapshot:
    """The critic's weights and its optimizer state at one moment, to be put back in place.

    Restoring copies into the existing tensors, so that tensors shared with a worker process
    stay shared.
    """

    def __init__(self, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter]):
        self._optimizer = optimizer
        self._parameters = critic_parameters
        self._weights = [param.detach().clone() for param in critic_parameters]
        self._states = [
            {
                key: value.clone() if isinstance(value, th.Tensor) else copy.deepcopy(value)
                for key, value in optimizer.state[param].items()
            }
            if param in optimizer.state
            else None
            for param in critic_parameters
        ]

    def restore(self) -> None:
        with th.no_grad():
            for param, weights in zip(self._parameters, self._weights, strict=True):
                param.copy_(weights)
        for param, saved in zip(self._parameters, self._states, strict=True):
            if saved is None:
                self._optimizer.state.pop(param, None)
                continue
            state = self._optimizer.state[param]
            for key in [key for key in state if key not in saved]:
                del state[key]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(current, th.Tensor) and isinstance(value, th.Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    state[key] = value


class FitStopped(Exception):
    """A fit stopped between two minibatches (the training process took it over).

    :param losses: the losses of the minibatches it fitted, in order
    """

    def __init__(self, losses: list[th.Tensor]):
        super().__init__(f"stopped after {len(losses)} minibatches")
        self.losses = losses


def regress(
    optimizer: th.optim.Optimizer,
    critic_parameters: list[nn.Parameter],
    minibatch_losses: Iterable[Callable[[], th.Tensor]],
    before: CriticSnapshot | None = None,
    losses: list[th.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """One optimizer step per minibatch loss, moving only ``critic_parameters``.

    A fit can stop between two minibatches and be continued by another process that shares the
    weights and the optimizer state: it passes the first one's ``before`` and ``losses`` and the
    remaining minibatches, and computes the same numbers as one uninterrupted fit.

    :param before: the state to put back when a weight becomes non-finite (default: the state now)
    :param losses: the losses of the minibatches fitted before ``minibatch_losses``
    :param stop: asked before each minibatch; :class:`FitStopped` is raised once it returns True
    :return: the mean minibatch loss, or None when a weight became non-finite; the critic
        weights and their optimizer state are then put back as ``before``
    """
    before = before if before is not None else CriticSnapshot(optimizer, critic_parameters)
    losses = list(losses) if losses is not None else []
    try:
        for minibatch_loss in minibatch_losses:
            if stop is not None and stop():
                raise FitStopped(losses)
            loss = minibatch_loss()
            grads = th.autograd.grad(loss, critic_parameters)
            for param, grad in zip(critic_parameters, grads, strict=True):
                param.grad = grad
            optimizer.step()
            losses.append(loss.detach())
    finally:
        for param in critic_parameters:
            param.grad = None
    if critic_parameters and not all(bool(th.isfinite(param).all()) for param in critic_parameters):
        before.restore()
        return None
    return th.stack(losses).mean().item() if losses else float("nan")


def fit_critic(
    policy: BasePolicy,
    optimizer: th.optim.Optimizer,
    critic_parameters: list[nn.Parameter],
    job: CriticJob,
    before: CriticSnapshot | None = None,
    losses: list[th.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """Minibatch regression of ``policy.predict_values`` on the returns (see :func:`regress`).

    With ``losses``, the fit continues after its first ``len(losses)`` minibatches.
    """
    for group in optimizer.param_groups:
        group["lr"] = job.learning_rate
    prefer_fused_adam(optimizer)
    observations = _as_tensors(job.observations, policy.device)
    if _cast_per_minibatch(policy, observations):
        # Row by row the same cast to float32 as SB3's, done once instead of on every minibatch.
        observations = observations.float()  # type: ignore[union-attr]
    returns = th.as_tensor(job.returns, device=policy.device)

    def minibatch_loss(indices: th.Tensor) -> Callable[[], th.Tensor]:
        def loss() -> th.Tensor:
            values = policy.predict_values(index_observations(observations, indices)).flatten()  # type: ignore[operator]
            return F.mse_loss(returns[indices], values)

        return loss

    n_samples = len(returns)
    minibatches = (
        minibatch_loss(permutation[start : start + job.batch_size])
        for permutation in th.as_tensor(job.permutations, device=policy.device)
        for start in range(0, n_samples, job.batch_size)
    )
    done = 0 if losses is None else len(losses)
    return regress(optimizer, critic_parameters, itertools.islice(minibatches, done, None), before, losses, stop)


def _cast_per_minibatch(policy: BasePolicy, observations: PyTorchObs) -> bool:
    """Whether ``policy.predict_values`` is SB3's, whose ``preprocess_obs`` casts a Box observation to float32."""
    return (
        isinstance(observations, th.Tensor)
        and observations.is_floating_point()
        and isinstance(policy.observation_space, spaces.Box)
        and isinstance(policy, ActorCriticPolicy)
        and type(policy).predict_values is ActorCriticPolicy.predict_values
    )


def checked_critic_loss(loss: float | None, update: int) -> float:
    """The loss of a critic fit; :class:`NonFiniteError` when the fit made a weight non-finite (see :func:`regress`)."""
    if loss is None:
        raise NonFiniteError(f"non-finite critic weights after the critic fit of update {update}; they were restored")
    return loss
