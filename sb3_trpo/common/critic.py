"""The critic's regression on the returns, in this process or in a background process.

TRPO fits its critic after the trust-region step, and the next rollout does not need the
critic until its end (values are computed in one batched pass after the rollout). So the
fit can run in a second process, on another core, while the next rollout is collected:
:class:`BackgroundCriticFit`. Both paths run :func:`fit_critic`, with the same minibatch
order, so they compute the same numbers.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo.common.validation import NonFiniteError


def index_observations(observations: PyTorchObs, index: th.Tensor | slice) -> PyTorchObs:
    """Select rows of a tensor or of every tensor of a dict observation."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def prefer_fused_adam(optimizer: th.optim.Optimizer) -> None:
    """Run SB3's default Adam with PyTorch's fused kernel: the same update in one call instead of one per tensor.

    Parameter groups where the user set ``fused`` or ``foreach`` (through
    ``policy_kwargs["optimizer_kwargs"]``) are left as they are.
    """
    if type(optimizer) not in (th.optim.Adam, th.optim.AdamW):
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
class CriticFitJob:
    """One critic fit: the rollout's observations and returns, and the minibatch order of every epoch."""

    observations: np.ndarray | dict[str, np.ndarray]
    returns: np.ndarray
    permutations: np.ndarray  # (epochs, samples)
    batch_size: int
    learning_rate: float

    @classmethod
    def from_rollout(cls, buffer: RolloutBuffer, epochs: int, batch_size: int, learning_rate: float) -> CriticFitJob:
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


def regress(
    optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter], minibatch_losses: Iterable[Callable[[], th.Tensor]]
) -> float | None:
    """One optimizer step per minibatch loss, moving only ``critic_parameters``.

    :return: the mean minibatch loss, or None when a weight became non-finite; the critic
        weights are then put back as they were before the fit
    """
    saved = [param.detach().clone() for param in critic_parameters]
    losses = []
    for minibatch_loss in minibatch_losses:
        loss = minibatch_loss()
        grads = th.autograd.grad(loss, critic_parameters)
        for param, grad in zip(critic_parameters, grads, strict=True):
            param.grad = grad
        optimizer.step()
        losses.append(loss.detach())
    for param in critic_parameters:
        param.grad = None
    if critic_parameters and not all(bool(th.isfinite(param).all()) for param in critic_parameters):
        with th.no_grad():
            for param, kept in zip(critic_parameters, saved, strict=True):
                param.copy_(kept)
        return None
    return th.stack(losses).mean().item() if losses else float("nan")


def fit_critic(
    policy: BasePolicy, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter], job: CriticFitJob
) -> float | None:
    """Minibatch regression of ``policy.predict_values`` on the returns (see :func:`regress`)."""
    for group in optimizer.param_groups:
        group["lr"] = job.learning_rate
    prefer_fused_adam(optimizer)
    observations = _as_tensors(job.observations, policy.device)
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
    return regress(optimizer, critic_parameters, minibatches)


def _initialize_adam_state(optimizer: th.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create Adam's state for ``params`` as its first step would, so that it can be shared before that step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not any(param is p for p in params) or optimizer.state[param]:
                continue
            state = optimizer.state[param]
            state["step"] = th.zeros((), dtype=th.float32, device=param.device)
            state["exp_avg"] = th.zeros_like(param, memory_format=th.preserve_format)
            state["exp_avg_sq"] = th.zeros_like(param, memory_format=th.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = th.zeros_like(param, memory_format=th.preserve_format)


def _serve(
    connection: Connection, policy: BasePolicy, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter]
) -> None:
    # This process is the worker's own: one thread leaves the other core to the rollout.
    th.set_num_threads(1)
    while True:
        job = connection.recv()
        if job is None:
            return
        try:
            connection.send(("done", fit_critic(policy, optimizer, critic_parameters, job)))
        except Exception:  # reported to the training process, which raises it
            connection.send(("error", traceback.format_exc()))


class BackgroundCriticFit:
    """Fits the critic in a forked process whose weights and Adam state are shared with this one.

    The policy's parameters and the critic's Adam state move to shared memory, so the
    worker's updates are the training process's weights and optimizer state: saving,
    loading and evaluating see them as usual once :meth:`result` has returned.
    Only Adam and AdamW on the CPU are supported.
    """

    def __init__(self, policy: BasePolicy, optimizer: th.optim.Optimizer, critic_parameters: list[nn.Parameter]):
        if type(optimizer) not in (th.optim.Adam, th.optim.AdamW):
            raise ValueError(f"background_critic_fit needs Adam or AdamW, got {type(optimizer).__name__}")
        if policy.device.type != "cpu":
            raise ValueError(f"background_critic_fit runs on the CPU only, the policy is on {policy.device}")
        _initialize_adam_state(optimizer, critic_parameters)
        policy.share_memory()
        for param in critic_parameters:
            for value in optimizer.state[param].values():
                value.share_memory_()
        self._connection, child = multiprocessing.get_context("fork").Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(child, policy, optimizer, critic_parameters), daemon=True
        )
        # Frozen objects are never visited by the worker's garbage collector, so their pages
        # stay shared instead of being copied one by one (a user's own freeze is left alone).
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            self._process.start()
        finally:
            if freeze:
                gc.unfreeze()
        child.close()
        self.pending = False

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._process.pid

    def submit(self, job: CriticFitJob) -> None:
        """Start fitting; the caller must call :meth:`result` before using the critic."""
        assert not self.pending, "the previous critic fit was not collected"
        self._connection.send(job)
        self.pending = True

    def result(self) -> float | None:
        """Wait for the fit; its mean loss, or None when the weights became non-finite (and were restored)."""
        assert self.pending, "no critic fit was submitted"
        status, value = self._connection.recv()
        self.pending = False
        if status == "error":
            raise RuntimeError(f"the background critic fit failed:\n{value}")
        return value

    def close(self) -> None:
        """Stop the worker process."""
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._connection.send(None)
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
        self._connection.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a background critic fit cannot be pickled")


def checked_critic_loss(loss: float | None, update: int) -> float:
    """The loss of a critic fit; :class:`NonFiniteError` when the fit made a weight non-finite (see :func:`regress`)."""
    if loss is None:
        raise NonFiniteError(f"non-finite critic weights after the critic fit of update {update}; they were restored")
    return loss


class CriticFit:
    """The critic fit of every update, in this process or in a background worker: the worker's one owner.

    A background fit runs while the next rollout is collected; its loss (or its error) is
    collected by :meth:`wait`, which the algorithm calls before anything reads the critic:
    the end of the rollout, saving, loading, the end of ``learn``.

    :param policy: the policy whose critic is fitted (with its optimizer)
    :param critic_parameters: the parameters the fit moves
    :param background: fit in a forked worker process (:class:`BackgroundCriticFit`), started at the first fit
    """

    def __init__(self, policy: BasePolicy, critic_parameters: list[nn.Parameter], background: bool):
        self.policy = policy
        self.critic_parameters = critic_parameters
        self.background = background
        self._worker: BackgroundCriticFit | None = None
        self._pending_update = 0

    @property
    def worker(self) -> BackgroundCriticFit | None:
        """The background worker, once started."""
        return self._worker

    def run(self, job: CriticFitJob, update: int) -> float | None:
        """Fit the critic on ``job``; the mean loss, or None when the fit runs in the background."""
        optimizer = self.policy.optimizer
        if not self.background:
            return checked_critic_loss(fit_critic(self.policy, optimizer, self.critic_parameters, job), update)
        if self._worker is None:
            self._worker = BackgroundCriticFit(self.policy, optimizer, self.critic_parameters)
        self._worker.submit(job)
        self._pending_update = update
        return None

    def wait(self) -> float | None:
        """Wait for a fit running in the background; its mean loss, or None when none is running."""
        if self._worker is None or not self._worker.pending:
            return None
        return checked_critic_loss(self._worker.result(), self._pending_update)

    def close(self) -> None:
        """Stop the worker (a running fit is abandoned: call :meth:`wait` first to keep it); the next fit starts a new one."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
