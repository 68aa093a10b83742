"""Rollout collection: SB3's own loop, and a faster one where it provably computes what SB3 computes.

SB3's ``OnPolicyAlgorithm.collect_rollouts`` runs the whole policy, actor and critic, at every
step. The batched loop, :func:`collect_rollout`, draws only the actions per step, bitwise as
``policy.forward`` draws them (:mod:`sb3_trpo.common.exact_sampler`), and computes the values
and log-probabilities of the whole rollout in one batched pass once the critic's background
fit has finished. That pass may round differently from SB3's per-step passes (the tests
bound the difference at 1e-6); everything that drives the trajectory (actions, observations,
rewards, episode starts) is SB3's to the bit, and so are the rewards with the bootstrap values
of time-limit truncations, computed one observation at a time as SB3 computes them.

Callbacks run in it as in SB3's loop, with the same ``self.locals``
(:mod:`sb3_trpo.common.rollout_locals`). What the batched pass assumes, that every step was
taken with the same weights, is checked after every callback call; a callback that wrote the
weights gets SB3's loop from there on (see :func:`collect_rollout`). Policies and buffers that
:mod:`sb3_trpo.common.rollout_gate` does not recognise run SB3's own loop throughout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, ConvertCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo.common.exact_sampler import ActionSampler, Observations
from sb3_trpo.common.rollout_gate import batched_rollout_sampler, recognised_policy
from sb3_trpo.common.rollout_locals import Deferred, LazyLocals, PolicyWatch, install_lazy_locals
from sb3_trpo.common.validation import check_finite, observation_arrays


# ------------------------------------------------------------------ the buffer
def add_transition(
    buffer: RolloutBuffer,
    observations: Observations,
    actions: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
) -> None:
    """``buffer.add`` without the value and log-probability (filled in after the rollout).

    SB3's ``RolloutBuffer`` is written directly, as its ``add`` writes it; a
    ``DictRolloutBuffer`` goes through its ``add`` with placeholders.
    """
    if type(buffer) is not RolloutBuffer:
        placeholder = th.zeros(buffer.n_envs)
        buffer.add(observations, actions, rewards, episode_starts, placeholder, placeholder)  # type: ignore[arg-type]
        return
    position = buffer.pos
    buffer.observations[position] = np.reshape(observations, (buffer.n_envs, *buffer.obs_shape))  # type: ignore[arg-type]
    buffer.actions[position] = actions.reshape((buffer.n_envs, buffer.action_dim))
    buffer.rewards[position] = rewards
    buffer.episode_starts[position] = episode_starts
    buffer.pos += 1
    buffer.full = buffer.pos == buffer.buffer_size


@dataclass
class TruncationBootstraps:
    """Steps where a time limit cut an episode, kept until the critic can be evaluated.

    SB3 adds ``gamma * V(terminal observation)`` to the step's reward, evaluating one
    observation at a time; :meth:`add_to` does the same, with the same expression on a copy
    of the same reward array, so the rewards are SB3's to the bit.
    """

    steps: list[tuple[int, np.ndarray, list[tuple[int, Observations]]]] = field(default_factory=list)

    def record(self, position: int, rewards: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """Keep the truncations of the step written at ``position`` (``infos`` indexed only where done, as SB3)."""
        truncated = [
            (idx, infos[idx]["terminal_observation"])
            for idx, done in enumerate(dones)
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False)
        ]
        if truncated:
            self.steps.append((position, np.array(rewards), truncated))

    def add_to(self, buffer: RolloutBuffer, policy: BasePolicy, gamma: float) -> None:
        """Add the bootstrap values to the buffer's rewards."""
        for position, rewards, truncated in self.steps:
            for idx, observation in truncated:
                terminal_obs = policy.obs_to_tensor(observation)[0]
                with th.no_grad():
                    terminal_value = policy.predict_values(terminal_obs)[0]  # type: ignore[operator]
                rewards[idx] += gamma * terminal_value
            buffer.rewards[position] = np.array(rewards)


def _flat_observations(buffer: RolloutBuffer, rows: int, device: th.device) -> PyTorchObs:
    observations = buffer.observations
    if isinstance(observations, dict):
        return {
            key: th.as_tensor(value[:rows].reshape(-1, *value.shape[2:]), device=device) for key, value in observations.items()
        }
    return th.as_tensor(observations[:rows].reshape(-1, *observations.shape[2:]), device=device)


def actions_for_log_prob(actions: th.Tensor, action_space: spaces.Space) -> th.Tensor:
    """Buffer actions in the form SB3's distributions take: Discrete a flat long tensor, others float.

    The buffer keeps the action space's dtype (int8 for MultiBinary), which Bernoulli's
    log-probability does not accept.
    """
    if isinstance(action_space, spaces.Discrete):
        return actions.long().flatten()
    return actions.float()


@th.no_grad()
def fill_values_and_log_probs(policy: ActorCriticPolicy, buffer: RolloutBuffer) -> None:
    """Write the values and log-probabilities of the steps in the buffer, in one batched pass."""
    rows, n_envs = buffer.pos, buffer.n_envs
    if rows == 0:
        return
    observations = _flat_observations(buffer, rows, policy.device)
    values = policy.predict_values(observations)
    actions = th.as_tensor(buffer.actions[:rows].reshape(rows * n_envs, -1), device=policy.device)
    log_probs = policy.get_distribution(observations).log_prob(actions_for_log_prob(actions, policy.action_space))
    buffer.values[:rows] = values.cpu().numpy().reshape(rows, n_envs)
    buffer.log_probs[:rows] = log_probs.cpu().numpy().reshape(rows, n_envs)


# ------------------------------------------------------------------ the loop
def collect_rollout(
    model: OnPolicyAlgorithm,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    wait_for_critic: Callable[[], None],
    critic_parameters: list[nn.Parameter],
    critic_pending: bool,
) -> bool:
    """``model.collect_rollouts``: SB3's loop, or the batched one where it computes the same.

    Where :func:`~sb3_trpo.common.rollout_gate.batched_rollout_sampler` gives no sampler, SB3's
    own ``OnPolicyAlgorithm.collect_rollouts`` runs (after ``wait_for_critic``: it reads the
    critic at every step). Otherwise :class:`BatchedRollout` collects the rollout, and calls
    ``wait_for_critic`` only once something needs the critic: the end of the rollout, a
    callback reading ``values``, ``log_probs`` or ``terminal_value``, or a callback writing
    the weights.

    :param critic_parameters: the parameters the critic's fit writes
    :param critic_pending: whether a fit of the critic may be running in the background
    :return: False when a callback stopped training, as SB3's ``collect_rollouts``
    """
    assert model._last_obs is not None, "No previous observation was provided"
    sample_actions = batched_rollout_sampler(model.policy, rollout_buffer)
    if sample_actions is None:
        wait_for_critic()
        return OnPolicyAlgorithm.collect_rollouts(model, env, callback, rollout_buffer, n_rollout_steps)
    rollout = BatchedRollout(model, env, callback, rollout_buffer, wait_for_critic, critic_parameters, critic_pending)
    return rollout.collect(sample_actions, n_rollout_steps)


class BatchedRollout:
    """One rollout of the batched loop: SB3's loop, step for step, with the policy's outputs deferred.

    Per step, only the actions are drawn; the callbacks get SB3's local variables, with the
    observation tensor, values, log-probabilities and truncation values as
    :class:`~sb3_trpo.common.rollout_locals.Deferred` entries, computed by SB3's per-step
    computation (``predict_values`` and ``get_distribution(obs_tensor).log_prob(actions)``,
    the two halves of ``forward``, which draw no random numbers) only if a callback reads
    them. A step whose outputs a callback read, or whose ``model._last_obs`` a callback
    replaced, keeps those per-step outputs in the buffer, as SB3 stores them.

    After every callback call :class:`~sb3_trpo.common.rollout_locals.PolicyWatch` checks
    that no weight was written. Where one was, the steps taken so far get their values and
    log-probabilities from the weights they were taken with, and the rest of the rollout runs
    SB3's per-step loop (``policy(obs_tensor)``), as SB3 would have from that step. The actions
    come from torch's global generator in both loops, in the same order, so a callback drawing
    from it shifts both alike. The environment is stepped and read as SB3's loop does, so a
    callback acting on it acts on both alike.
    """

    def __init__(
        self,
        model: OnPolicyAlgorithm,
        env: VecEnv,
        callback: BaseCallback,
        buffer: RolloutBuffer,
        wait_for_critic: Callable[[], None],
        critic_parameters: list[nn.Parameter],
        critic_pending: bool,
    ):
        self.model, self.policy, self.env, self.callback, self.buffer = model, model.policy, env, callback, buffer
        self._wait_for_critic = wait_for_critic
        self._critic_parameters = critic_parameters
        self._critic_pending = critic_pending
        # learn(callback=None) calls an empty ConvertCallback, which can write nothing.
        self._callback_runs_code = not (type(callback) is ConvertCallback and callback.callback is None)
        self._critic_final = False
        self._written: list[int] | None = None  # set once a callback wrote a weight: SB3's loop runs from there on
        self.bootstraps = TruncationBootstraps()
        self._per_step_rows: list[tuple[int, np.ndarray, np.ndarray]] = []
        # SB3's loop's local variables, as its callbacks see them (SB3 passes ``locals()``).
        self.frame = LazyLocals(self=model, env=env, callback=callback, rollout_buffer=buffer)

    def collect(self, sample_actions: ActionSampler, n_rollout_steps: int) -> bool:
        """Collect the rollout (see the class); False when a callback stopped training."""
        model, policy, env, callback, frame = self.model, self.policy, self.env, self.callback, self.frame
        policy.set_training_mode(False)
        n_steps = 0
        self.buffer.reset()
        if model.use_sde:
            policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        install_lazy_locals(callback)
        self.watch = PolicyWatch(policy, self._critic_parameters, self._critic_pending)
        dict.update(frame, n_rollout_steps=n_rollout_steps)
        while n_steps < n_rollout_steps:
            if model.use_sde and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
                policy.reset_noise(env.num_envs)
            observations: Observations = model._last_obs  # type: ignore[assignment]
            obs_tensor: Any
            values: Any
            log_probs: Any
            if self._written is None:
                actions = sample_actions(observations)
                obs_tensor, values, log_probs = self._deferred_outputs(observations, actions)
            else:
                with th.no_grad():
                    obs_tensor = obs_as_tensor(observations, model.device)
                    actions, values, log_probs = policy(obs_tensor)
                actions = actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(model.action_space, spaces.Box):
                if policy.squash_output:
                    clipped_actions = policy.unscale_action(clipped_actions)
                else:
                    clipped_actions = np.clip(actions, model.action_space.low, model.action_space.high)
            new_obs, rewards, dones, infos = env.step(clipped_actions)
            check_finite("observations", observation_arrays(new_obs), model._n_updates + 1)  # type: ignore[arg-type]
            model.num_timesteps += env.num_envs
            dict.update(
                frame,
                n_steps=n_steps,
                obs_tensor=obs_tensor,
                actions=actions,
                values=values,
                log_probs=log_probs,
                clipped_actions=clipped_actions,
                new_obs=new_obs,
                rewards=rewards,
                dones=dones,
                infos=infos,
            )
            callback.update_locals(frame)
            proceed = callback.on_step()
            if self._written is None and self._callback_runs_code:
                if self.watch.critic_written_during_fit():
                    raise RuntimeError(
                        "a callback wrote the critic's weights while the critic was being fitted in the background "
                        "(background_critic_fit), so the fit and the write raced; SB3 fits the critic before the "
                        "rollout: pass background_critic_fit=False to train with such a callback"
                    )
                if self.watch.written():
                    values, log_probs = self._switch_to_sb3_loop(values, log_probs)
            if not proceed:
                if self._written is None:
                    self._fill_buffer()
                    self._compute_pending_locals()
                return False
            model._update_info_buffer(infos, dones)
            n_steps += 1
            if isinstance(model.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            self._bootstrap(rewards, dones, infos)
            dict.update(frame, actions=actions, n_steps=n_steps)
            self._add(observations, actions, rewards, values, log_probs)
            model._last_obs = new_obs  # type: ignore[assignment]
            model._last_episode_starts = dones
        if self._written is None:
            self._fill_buffer()
            self._compute_pending_locals()
            if self.watch.unseen_actor_writes() or not recognised_policy(policy):
                raise RuntimeError(
                    "a callback changed the policy during the rollout in a way the batched rollout cannot follow "
                    "(a write into .data or a NumPy view of a weight, a new module or hook); write weights with torch "
                    "operations under th.no_grad() (as load_state_dict does), which the rollout follows exactly"
                )
        with th.no_grad():
            values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
        self.buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        dict.update(frame, values=values)
        callback.update_locals(frame)
        callback.on_rollout_end()
        return True

    # -------------------------------------------------------------- the policy's outputs
    def _critic(self) -> None:
        """Wait for the critic's fit; the critic's weights it left are those every step was taken with."""
        if not self._critic_final:
            self._wait_for_critic()
            self.watch.settle()
            self._critic_final = True

    def _taken_with(self) -> list[int]:
        """The weights to hold at their start values for a deferred output: none once SB3's loop runs (it
        computes them at once, with the weights then); the weights written since the start before that."""
        return [] if self._written is not None else self.watch.written()

    def _deferred_outputs(self, observations: Observations, actions: np.ndarray) -> tuple[Deferred, Deferred, Deferred]:
        """The step's ``obs_tensor``, ``values`` and ``log_probs``, computed as SB3 computes them when first read."""
        policy = self.policy
        obs_tensor = Deferred(lambda: obs_as_tensor(observations, policy.device))

        def outputs() -> tuple[th.Tensor, th.Tensor]:
            self._critic()
            with self.watch.start_weights(self._taken_with()), th.no_grad():
                tensor = obs_tensor.get()
                taken = th.as_tensor(actions, device=policy.device)
                if isinstance(policy.action_space, spaces.Box):
                    taken = taken.reshape(len(taken), -1)  # the shape get_actions gives
                return policy.predict_values(tensor), policy.get_distribution(tensor).log_prob(taken)

        both = Deferred(outputs)
        return obs_tensor, Deferred(lambda: both.get()[0]), Deferred(lambda: both.get()[1])

    def _switch_to_sb3_loop(self, values: Deferred, log_probs: Deferred) -> tuple[th.Tensor, th.Tensor]:
        """A callback wrote weights: fill the steps so far from the weights they were taken with; SB3's loop goes on.

        :return: the current step's values and log-probabilities (from the weights it was taken with)
        """
        self._critic()
        self._written = self.watch.written()
        with self.watch.start_weights(self._written):
            self._fill_buffer()
            self._compute_pending_locals()
            return values.get(), log_probs.get()

    def _compute_pending_locals(self) -> None:
        """Compute the deferred entries a callback may still read, while the weights are those they belong to
        (after this rollout, ``self.locals`` keeps them, as SB3's loop leaves its last step's)."""
        for entry in ("obs_tensor", "values", "log_probs", "terminal_value"):
            self.frame.get(entry)

    # -------------------------------------------------------------- the buffer
    def _bootstrap(self, rewards: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """SB3's bootstrap of time-limit truncations: deferred in the batched loop, at once in SB3's."""
        if self._written is None:
            self.bootstraps.record(self.buffer.pos, rewards, dones, infos)
        for idx, done in enumerate(dones):
            dict.update(self.frame, idx=idx, done=done)
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False):
                terminal_obs = self.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                terminal_value: Any = Deferred(functools.partial(self._terminal_value, terminal_obs))
                if self._written is not None:
                    terminal_value = terminal_value.get()
                    rewards[idx] += self.model.gamma * terminal_value
                dict.update(self.frame, terminal_obs=terminal_obs, terminal_value=terminal_value)

    def _terminal_value(self, terminal_obs: PyTorchObs) -> th.Tensor:
        self._critic()
        with self.watch.start_weights(self._taken_with()), th.no_grad():
            return self.policy.predict_values(terminal_obs)[0]

    def _add(self, observations: Observations, actions: np.ndarray, rewards: np.ndarray, values: Any, log_probs: Any) -> None:
        model, buffer = self.model, self.buffer
        if self._written is not None:
            buffer.add(model._last_obs, actions, rewards, model._last_episode_starts, values, log_probs)  # type: ignore[arg-type]
            return
        if values.computed or log_probs.computed or model._last_obs is not observations:
            # SB3 stores these per-step outputs (as its ``add`` copies them), whatever the observation stored.
            value, log_prob = values.get(), log_probs.get()
            self._per_step_rows.append((buffer.pos, value.clone().cpu().numpy().flatten(), log_prob.clone().cpu().numpy()))
        add_transition(buffer, model._last_obs, actions, rewards, model._last_episode_starts)  # type: ignore[arg-type]

    def _fill_buffer(self) -> None:
        """The values and log-probabilities of the steps so far, and their truncations' bootstraps."""
        self._critic()
        fill_values_and_log_probs(self.policy, self.buffer)
        self.bootstraps.add_to(self.buffer, self.policy, self.model.gamma)
        for position, values, log_probs in self._per_step_rows:
            self.buffer.values[position] = values
            self.buffer.log_probs[position] = log_probs
