"""TRPO with LSTM policies, on sb3-contrib's recurrent policies and rollout buffers.

The trust-region step is measured on the policy the agent actually ran: the surrogate,
the KL, its Hessian and the line search are evaluated on whole padded sequences, each
starting from the LSTM state stored when it was collected, with padding masked out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from sb3_contrib.ppo_recurrent import RecurrentPPO
from sb3_contrib.ppo_recurrent.policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution, kl_divergence
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo.critic import regress
from sb3_trpo.npg import PolicyBatch, split_actor_critic
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_hyperparameter


@dataclass
class RecurrentPolicyBatch(PolicyBatch):
    """A policy batch of padded sequences (rows ``n_sequences * max_length``, sequence-major).

    :param lstm_states: actor LSTM ``(hidden, cell)`` at the start of each sequence, as collected
    :param episode_starts: where the LSTM state is reset inside a sequence
    :param mask: False on padding
    """

    lstm_states: tuple[th.Tensor, th.Tensor]
    episode_starts: th.Tensor
    mask: th.Tensor


def _every_kth_sequence(tensor: th.Tensor, n_sequences: int, k: int) -> th.Tensor:
    """Keep every ``k``-th padded sequence of a sequence-major flat tensor."""
    sequences = tensor.reshape(n_sequences, -1, *tensor.shape[1:])
    return sequences[::k].reshape(-1, *tensor.shape[1:])


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
    that :func:`sb3_trpo.npg.split_actor_critic` probes."""

    def __init__(self, policy: RecurrentActorCriticPolicy):
        self.policy = policy
        self.observation_space = policy.observation_space

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.policy.parameters()

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
    averages surrogate, KL and entropy over the real steps only. The critic is fitted on
    minibatches of ``batch_size`` steps cut into sequences the same way (its own LSTM with
    ``enable_critic_lstm=True``, the default; the actor's LSTM, not moved by the critic fit,
    with ``shared_lstm=True``; a linear layer when both are False).

    Every parameter of :class:`sb3_trpo.TRPO`, with these differences:

    :param policy: a ``RecurrentActorCriticPolicy``: ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``,
        ``"MultiInputLstmPolicy"``; LSTM options (``lstm_hidden_size``, ``n_lstm_layers``,
        ``shared_lstm``, ``enable_critic_lstm``, ``lstm_kwargs``) go in ``policy_kwargs``
    :param n_steps: steps per environment per update (default 128, as RecurrentPPO)
    :param sub_sampling_factor: keep every k-th sequence of the rollout for the actor step
        (sequences are never cut)
    :param rollout_buffer_class: ``None`` (a ``RecurrentRolloutBuffer`` or ``RecurrentDictRolloutBuffer``)
        or a subclass of one of them
    :param fisher_vector_product: ``"analytic"`` or ``"double_backprop"``, as for :class:`sb3_trpo.TRPO`;
        both leave out the padding of sequences
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy: RecurrentActorCriticPolicy
    rollout_buffer: RecurrentRolloutBuffer  # type: ignore[assignment]

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
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        fisher_vector_product: str = "analytic",
        cg_residual_tol: float = 1e-10,
        _init_setup_model: bool = True,
    ):
        if rollout_buffer_class is not None:
            check_hyperparameter(
                "rollout_buffer_class",
                rollout_buffer_class,
                issubclass(rollout_buffer_class, RecurrentRolloutBuffer | RecurrentDictRolloutBuffer),
                "a RecurrentRolloutBuffer or RecurrentDictRolloutBuffer subclass (the LSTM states must be stored)",
            )
        self._last_lstm_states: RNNStates | None = None
        super().__init__(
            policy,  # type: ignore[arg-type]
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
            _init_setup_model=_init_setup_model,
        )

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, use_sde=self.use_sde, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            raise ValueError(f"RecurrentTRPO needs a RecurrentActorCriticPolicy, got {type(self.policy).__name__}")
        lstm = self.policy.lstm_actor
        state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        self._last_lstm_states = RNNStates(
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
        )
        if self.rollout_buffer_class is None:
            dict_observations = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = RecurrentDictRolloutBuffer if dict_observations else RecurrentRolloutBuffer
        buffer_class = cast(type[RecurrentRolloutBuffer], self.rollout_buffer_class)
        self.rollout_buffer = buffer_class(
            self.n_steps,
            self.observation_space,
            self.action_space,
            (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )
        self.actor_parameters, self.critic_parameters = split_actor_critic(_FromZeroStates(self.policy))  # type: ignore[arg-type]

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
        # One sample of the whole rollout: every sequence, padded, from its stored LSTM state.
        (data,) = list(self.rollout_buffer.get(batch_size=None))
        n_sequences, k = data.lstm_states.pi[0].shape[1], self.sub_sampling_factor

        def rows(tensor: th.Tensor) -> th.Tensor:
            return _every_kth_sequence(tensor, n_sequences, k)

        observations = data.observations
        observations = (
            {key: rows(value) for key, value in observations.items()} if isinstance(observations, dict) else rows(observations)
        )
        actions = rows(data.actions)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        mask = rows(data.mask) > 0.5
        advantages = rows(data.advantages)
        if self.normalize_advantage:
            advantages = (advantages - advantages[mask].mean()) / (advantages[mask].std() + 1e-8)
        hidden, cell = data.lstm_states.pi
        return RecurrentPolicyBatch(
            observations,
            actions,
            rows(data.old_log_prob),
            advantages,
            (hidden[:, ::k].contiguous(), cell[:, ::k].contiguous()),
            rows(data.episode_starts),
            mask,
        )

    def _distribution(self, batch: PolicyBatch) -> Distribution:
        assert isinstance(batch, RecurrentPolicyBatch)
        with _differentiable_twice(self.device):
            distribution, _ = self.policy.get_distribution(batch.observations, batch.lstm_states, batch.episode_starts)  # type: ignore[arg-type]
        return distribution

    def _surrogate(self, distribution: Distribution, batch: PolicyBatch) -> th.Tensor:
        assert isinstance(batch, RecurrentPolicyBatch)
        ratio = th.exp(distribution.log_prob(batch.actions) - batch.old_log_prob)
        return (batch.advantages * ratio)[batch.mask].mean()

    def _mean_kl(self, p: Distribution, q: Distribution, batch: PolicyBatch) -> th.Tensor:
        assert isinstance(batch, RecurrentPolicyBatch)
        return kl_divergence(p, q)[batch.mask].mean()

    def _kl_rows(self, batch: PolicyBatch) -> th.Tensor:
        assert isinstance(batch, RecurrentPolicyBatch)
        return batch.mask

    def _mean_entropy(self, entropy: th.Tensor, batch: PolicyBatch) -> float:
        assert isinstance(batch, RecurrentPolicyBatch)
        return entropy[batch.mask].mean().item()

    # ------------------------------------------------------------------ critic on sequences
    def _fit_critic(self, update: int) -> float:
        """Fit the value function on minibatches of sequences, moving only parameters the actor does not use."""

        def sequence_loss(data: Any) -> Callable[[], th.Tensor]:
            def loss() -> th.Tensor:
                mask = data.mask > 0.5
                values = self.policy.predict_values(data.observations, data.lstm_states.vf, data.episode_starts).flatten()  # type: ignore[arg-type]
                return ((data.returns - values) ** 2)[mask].mean()

            return loss

        minibatches = (
            sequence_loss(data) for _ in range(self.n_critic_updates) for data in self.rollout_buffer.get(self.batch_size)
        )
        return self._critic_loss(regress(self.policy.optimizer, self.critic_parameters, minibatches), update)

