"""TRPO with LSTM policies, on sb3-contrib's recurrent policies and rollout buffers.

The trust-region step is measured on the policy the agent actually ran: the surrogate,
the KL, its Hessian and the line search are evaluated on whole padded sequences, each
starting from the LSTM state stored when it was collected, with padding masked out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch as th
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from sb3_contrib.ppo_recurrent import RecurrentPPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo.common.critic import checked_critic_loss, regress
from sb3_trpo.common.critic_fitter import BackgroundSetting
from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.policy_step import PolicyBatch
from sb3_trpo.trpo.trpo import TRPO
from sb3_trpo.trpo_recurrent.policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy


@dataclass(kw_only=True)
class RecurrentPolicyBatch(PolicyBatch):
    """A policy batch of padded sequences (rows ``n_sequences * max_length``, sequence-major; ``mask`` False on padding).

    :param lstm_states: actor LSTM ``(hidden, cell)`` at the start of each sequence, as collected
    :param episode_starts: where the LSTM state is reset inside a sequence
    """

    lstm_states: tuple[th.Tensor, th.Tensor]
    episode_starts: th.Tensor


def _differentiable_twice(device: th.device) -> contextlib.AbstractContextManager:
    """cuDNN's LSTM has no double backward, which the KL Hessian needs: use the native kernel then."""
    if device.type != "cuda" or not th.is_grad_enabled():
        return contextlib.nullcontext()
    cudnn = th.backends.cudnn
    return cudnn.flags(
        enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
    )


class _FromZeroStates:
    """The recurrent policy seen from zero LSTM states, with the feed-forward interface
    that :func:`sb3_trpo.common.policies.split_actor_critic` probes."""

    def __init__(self, policy: RecurrentActorCriticPolicy):
        self.policy = policy
        self.observation_space = policy.observation_space

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.policy.parameters()

    def modules(self) -> Iterator[nn.Module]:
        return self.policy.modules()

    def buffers(self) -> Iterator[th.Tensor]:
        return self.policy.buffers()

    def obs_to_tensor(self, observation: Any) -> tuple[PyTorchObs, bool]:
        return self.policy.obs_to_tensor(observation)

    def _zeros(self) -> tuple[tuple[th.Tensor, th.Tensor], th.Tensor]:
        shape = self.policy.lstm_hidden_state_shape
        zeros = th.zeros(shape, device=self.policy.device)
        return (zeros, zeros.clone()), th.zeros(1, device=self.policy.device)

    def get_distribution(self, observation: PyTorchObs) -> Distribution:
        states, episode_starts = self._zeros()
        return self.policy.get_distribution(observation, states, episode_starts)[0]  # type: ignore[arg-type]

    def predict_values(self, observation: PyTorchObs) -> th.Tensor:
        states, episode_starts = self._zeros()
        return self.policy.predict_values(observation, states, episode_starts)  # type: ignore[arg-type]


class RecurrentTRPO(TRPO):
    """
    TRPO with LSTM policies (sb3-contrib's ``RecurrentActorCriticPolicy``).

    Rollouts are collected as sb3-contrib's ``RecurrentPPO`` collects them, storing the
    actor's and critic's LSTM states in a ``RecurrentRolloutBuffer``. The trust-region step
    takes the whole rollout as padded sequences that start from the stored states, and
    averages surrogate, KL and entropy over the real steps only (the batch's mask). The
    critic is fitted on minibatches of ``batch_size`` steps cut into sequences the same way
    (its own LSTM with ``enable_critic_lstm=True``, the default; the actor's LSTM, not moved
    by the critic fit, with ``shared_lstm=True``; a linear layer when both are False).

    :param policy: The policy model to use: a ``RecurrentActorCriticPolicy`` (``"MlpLstmPolicy"``,
        ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"``); LSTM options (``lstm_hidden_size``, ``n_lstm_layers``,
        ``shared_lstm``, ``enable_critic_lstm``, ``lstm_kwargs``) go in ``policy_kwargs``
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate for the value function, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update (default 128, as RecurrentPPO)
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size for the value function, in steps, cut into sequences as RecurrentPPO cuts them
    :param gamma: Discount factor, in (0, 1]
    :param cg_max_steps: maximum number of steps in the Conjugate Gradient algorithm
        for computing the Hessian vector product
    :param cg_damping: damping in the Hessian vector product computation
    :param line_search_shrinking_factor: step-size reduction factor for the line-search
        (i.e., ``theta_new = theta + alpha^i * step``), in (0, 1)
    :param line_search_max_iter: maximum number of iteration for the backtracking line-search
    :param n_critic_updates: number of critic updates (epochs over the rollout) per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator, in [0, 1]
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: ``None`` (a ``RecurrentRolloutBuffer`` or ``RecurrentDictRolloutBuffer``),
        or a subclass of one of them: the LSTM states must be stored
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize or not the advantage
    :param target_kl: Target Kullback-Leibler divergence between updates (the trust-region radius delta).
        Should be small for stability. Values like 0.01, 0.05. It can be a function of the current
        progress remaining (from 1 to 0), as ``learning_rate``, that is > 0 at progress 1 and 0
    :param sub_sampling_factor: keep every k-th sequence of the rollout for the actor step
        (sequences are never cut)
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param fisher_vector_product: ``"analytic"`` or ``"double_backprop"``, as for :class:`sb3_trpo.TRPO`;
        both leave out the padding of sequences
    :param cg_residual_tol: conjugate gradient stops once the squared residual norm is below this
    :param background_critic_fit: ``"auto"`` or False (both fit the critic in the training process); True
        is refused: rollouts are collected with ``RecurrentPPO``'s loop,
        which evaluates the critic at every step, so the critic fit cannot overlap the rollout
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy_base = RecurrentActorCriticPolicy
    rollout_buffer_classes = (RecurrentRolloutBuffer, RecurrentDictRolloutBuffer)
    background_critic_fit_refused = "RecurrentPPO's rollout loop evaluates the critic at every step"
    policy: RecurrentActorCriticPolicy
    rollout_buffer: RecurrentRolloutBuffer

    def __init__(
        self,
        policy: str | type[RecurrentActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 128,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float | Schedule = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        fisher_vector_product: str = "analytic",
        cg_residual_tol: float = 1e-10,
        background_critic_fit: BackgroundSetting = "auto",
        _init_setup_model: bool = True,
    ):
        self._last_lstm_states: RNNStates | None = None
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            fisher_vector_product=fisher_vector_product,
            cg_residual_tol=cg_residual_tol,
            background_critic_fit=background_critic_fit,
            _init_setup_model=_init_setup_model,
        )

    def _setup_model(self) -> None:
        super()._setup_model()
        lstm = self.policy.lstm_actor
        state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        self._last_lstm_states = RNNStates(
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
        )

    def _rollout_buffer_arguments(self) -> dict[str, Any]:
        lstm = self.policy.lstm_actor
        return {"hidden_state_shape": (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size)}

    def _split_actor_critic(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return split_actor_critic(_FromZeroStates(self.policy))

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Collect a rollout exactly as ``RecurrentPPO`` does, storing the LSTM states in the buffer."""
        return RecurrentPPO.collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps)  # type: ignore[arg-type]

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_lstm_states"]

    # ------------------------------------------------------------------ actor step on sequences
    def _policy_batch(self) -> RecurrentPolicyBatch:
        """The whole rollout (every ``sub_sampling_factor``-th sequence) as padded sequences from their stored LSTM states."""
        (data,) = list(self.rollout_buffer.get(batch_size=None))
        n_sequences, k = data.lstm_states.pi[0].shape[1], self.sub_sampling_factor
        # Rows are sequence-major: row i * max_length + t is step t of sequence i.
        rows = th.arange(len(data.mask), device=data.mask.device).reshape(n_sequences, -1)[::k].reshape(-1)
        hidden, cell = data.lstm_states.pi
        return RecurrentPolicyBatch(
            **self._batch_fields(data, rows, mask=data.mask[rows] > 0.5),
            lstm_states=(hidden[:, ::k].contiguous(), cell[:, ::k].contiguous()),
            episode_starts=data.episode_starts[rows],
        )

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        assert isinstance(batch, RecurrentPolicyBatch)
        with _differentiable_twice(self.device):
            distribution, _ = self.policy.get_distribution(batch.observations, batch.lstm_states, batch.episode_starts)  # type: ignore[arg-type]
        return distribution

    # ------------------------------------------------------------------ critic on sequences
    def _fit_critic(self, update: int) -> float:
        """Fit the value function on minibatches of sequences, moving only parameters the actor does not use."""

        def sequence_loss(data: Any) -> Callable[[], th.Tensor]:
            def loss() -> th.Tensor:
                mask = data.mask > 0.5
                values = self.policy.predict_values(data.observations, data.lstm_states.vf, data.episode_starts).flatten()
                return ((data.returns - values) ** 2)[mask].mean()

            return loss

        minibatches = (
            sequence_loss(data) for _ in range(self.n_critic_updates) for data in self.rollout_buffer.get(self.batch_size)
        )
        return checked_critic_loss(regress(self.policy.optimizer, self.critic_parameters, minibatches), update)
