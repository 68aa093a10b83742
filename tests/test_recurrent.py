"""RecurrentTRPO: the trust region on stored-state sequences, the critic on sequences, and memory."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo import TRPO, RecurrentTRPO
from sb3_trpo.common.policy_step import batch_fisher_vector_product, batch_kl, surrogate
from sb3_trpo.common.trust_region import flatten
from sb3_trpo.trpo_recurrent.trpo_recurrent import RecurrentPolicyBatch
from tests.helpers import actor_vector, critic_vector, dense_hessian, recording_logger, tiny_double_model


class CueRecall(gym.Env):
    """A cue of +-1 is shown at the first step only; ``length`` steps later the action must name it.

    The observation at the query step is the same whatever the cue, so a feed-forward
    policy is right half of the time at best; a policy with memory can always be right.
    """

    observation_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, length: int = 6):
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue = int(self.np_random.integers(2))
        self.t = 0
        return np.array([2 * self.cue - 1, 0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == self.length:
            return np.zeros(2, dtype=np.float32), float(int(action) == self.cue), True, False, {}
        query = 1.0 if self.t == self.length - 1 else 0.0
        return np.array([0, query], dtype=np.float32), 0.0, False, False, {}


class DictCueRecall(CueRecall):
    observation_space = spaces.Dict({"signal": CueRecall.observation_space})  # type: ignore[assignment]

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return {"signal": obs}, info

    def step(self, action):
        obs, *rest = super().step(action)
        return {"signal": obs}, *rest


ENVS = {"categorical": lambda: CueRecall(), "gaussian": lambda: gym.make("Pendulum-v1")}


# Three sequences padded to length 4: the second is one step shorter, the third two; each
# continues from its stored state, and episodes start inside the first and the third.
LENGTHS = (4, 3, 2)
EPISODE_STARTS = ((0, 0, 1, 0), (0, 0, 0, 0), (0, 1, 0, 0))


def sequence_batch(model: RecurrentTRPO, seed: int = 1) -> RecurrentPolicyBatch:
    generator = th.Generator().manual_seed(seed)
    n_seq, max_length = len(LENGTHS), max(LENGTHS)
    low = th.as_tensor(model.observation_space.low)
    observations = low + th.rand(n_seq * max_length, *low.shape, generator=generator, dtype=th.float64) * 2 * low.abs()
    mask = th.tensor([[t < length for t in range(max_length)] for length in LENGTHS]).flatten()
    observations[~mask] = 0.0
    episode_starts = th.tensor(EPISODE_STARTS, dtype=th.float64).flatten()
    hidden_size = model.policy.lstm_actor.hidden_size
    states = tuple(th.randn(1, n_seq, hidden_size, generator=generator, dtype=th.float64) for _ in range(2))
    with th.no_grad():
        distribution, _ = model.policy.get_distribution(observations, states, episode_starts)
        actions = distribution.sample()
        old_log_prob = distribution.log_prob(actions)
    advantages = th.randn(n_seq * max_length, generator=generator, dtype=th.float64)
    return RecurrentPolicyBatch(
        observations=observations,
        actions=actions,
        old_log_prob=old_log_prob,
        advantages=advantages,
        mask=mask,
        lstm_states=states,  # type: ignore[arg-type]
        episode_starts=episode_starts,
    )


def reference_mean_kl(model: RecurrentTRPO, batch: RecurrentPolicyBatch, zero_states: bool = False):
    """Mean KL over the real steps, each sequence run on its own, unpadded, from its initial state."""
    max_length = max(LENGTHS)

    def distributions():
        for index, length in enumerate(LENGTHS):
            rows = slice(index * max_length, index * max_length + length)
            states = tuple(state[:, index : index + 1] for state in batch.lstm_states)
            if zero_states:
                states = tuple(th.zeros_like(state) for state in states)
            yield model.policy.get_distribution(batch.observations[rows], states, batch.episode_starts[rows])[0]

    with th.no_grad():
        old = [copy.copy(distribution) for distribution in distributions()]

    def mean_kl() -> th.Tensor:
        terms = [kl_divergence(before, after).reshape(-1) for before, after in zip(old, distributions(), strict=True)]
        return th.cat(terms).mean()

    return mean_kl


@pytest.mark.parametrize("kind", sorted(ENVS))
@pytest.mark.parametrize("method", ["analytic", "double_backprop"])
def test_fisher_vector_product_of_lstm_policy_equals_dense_kl_hessian(kind: str, method: str) -> None:
    model = tiny_double_model(RecurrentTRPO, ENVS[kind](), method)
    batch = sequence_batch(model)
    hessian = dense_hessian(model.policy, model.actor_parameters, reference_mean_kl(model, batch))
    from_zero_states = dense_hessian(model.policy, model.actor_parameters, reference_mean_kl(model, batch, zero_states=True))
    with th.no_grad():
        old = copy.copy(model._distribution(batch))
    product = batch_fisher_vector_product(method, model._distribution(batch), old, batch, model.actor_parameters)
    log_std = getattr(model.policy, "log_std", None)
    network_entries = flatten([th.full_like(p, float(p is not log_std)) for p in model.actor_parameters])
    generator = th.Generator().manual_seed(7)
    for _ in range(3):
        v = th.randn(hessian.shape[0], generator=generator, dtype=th.float64)
        expected = hessian @ v
        assert th.allclose(product(v), expected, rtol=1e-7, atol=1e-10)
        # The stored initial states matter: starting from zeros gives another Fisher (the
        # state-independent log-std block, the same either way, is left out of this check).
        v_net = v * network_entries
        gap = float((from_zero_states @ v_net - hessian @ v_net).norm())
        assert gap > 0.01 * float((hessian @ v_net).norm()), "far outside the 1e-7 tolerance above"


@pytest.mark.parametrize("kind", sorted(ENVS))
def test_surrogate_and_kl_ignore_padding(kind: str) -> None:
    model = tiny_double_model(RecurrentTRPO, ENVS[kind]())
    batch = sequence_batch(model)
    reference = reference_mean_kl(model, batch)
    with th.no_grad():
        old = copy.copy(model._distribution(batch))
        # At the old policy every ratio is 1: the surrogate is the mean advantage of the real steps.
        objective = float(surrogate(model._distribution(batch), batch))
        for param in model.actor_parameters:
            param.add_(0.2 * th.randn_like(param))
        # The policy returns one distribution object, re-parametrised: use `new` before `reference()`.
        kl = float(batch_kl(old, model._distribution(batch), batch).mean)
        expected_kl = float(reference())
    assert objective == pytest.approx(float(batch.advantages[batch.mask].mean()), rel=1e-12)
    assert abs(objective - float(batch.advantages.mean())) > 1e-3, "padding carries advantages in this batch"
    assert kl == pytest.approx(expected_kl, rel=1e-9)
    assert kl > 1e-4


class Collect(BaseCallback):
    def _on_step(self) -> bool:
        return True


def collected(model: RecurrentTRPO) -> None:
    model._setup_learn(model.n_steps * model.n_envs, None)
    callback = Collect()
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)


def test_batch_replays_the_policy_the_agent_ran() -> None:
    """Recomputed on the padded sequences from the stored states, every log-probability is the one stored while acting."""
    env = make_vec_env(lambda: CueRecall(length=5), n_envs=3, seed=0)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=24, policy_kwargs=dict(lstm_hidden_size=8), seed=0)
    model.learn(72)  # trained weights, non-zero LSTM states at the rollout boundaries
    collected(model)
    batch = model._policy_batch()
    assert int(batch.mask.sum()) == 72 and len(batch.mask) > 72, "the batch has padding"
    with th.no_grad():
        log_prob = model._distribution(batch).log_prob(batch.actions)
        gap = (log_prob - batch.old_log_prob)[batch.mask].abs().max()
        zero_states = tuple(th.zeros_like(state) for state in batch.lstm_states)
        distribution, _ = model.policy.get_distribution(batch.observations, zero_states, batch.episode_starts)
        zero_gap = (distribution.log_prob(batch.actions) - batch.old_log_prob)[batch.mask].abs().max()
    assert float(gap) < 1e-5
    assert float(zero_gap) > 1e-3, "without the stored states the replay differs"


def test_sub_sampling_keeps_whole_sequences() -> None:
    env = make_vec_env(lambda: CueRecall(length=5), n_envs=2, seed=0)
    model = RecurrentTRPO(
        "MlpLstmPolicy", env, n_steps=20, sub_sampling_factor=2, policy_kwargs=dict(lstm_hidden_size=4), seed=0
    )
    collected(model)
    batch = model._policy_batch()
    n_kept = batch.lstm_states[0].shape[1]
    max_length = len(batch.mask) // n_kept
    assert n_kept >= 4
    with th.no_grad():
        gap = (model._distribution(batch).log_prob(batch.actions) - batch.old_log_prob)[batch.mask].abs().max()
    assert float(gap) < 1e-5
    # Each kept sequence is a prefix of real steps followed by padding.
    rows = batch.mask.reshape(n_kept, max_length).int()
    assert (rows[:, 1:] <= rows[:, :-1]).all()
    assert float(batch.advantages[batch.mask].mean()) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("lstm_options", "critic_modules", "actor_only_modules"),
    [
        ({}, {"lstm_critic"}, {"lstm_actor"}),
        ({"shared_lstm": True, "enable_critic_lstm": False}, set(), {"lstm_actor"}),
        ({"enable_critic_lstm": False}, {"critic"}, {"lstm_actor"}),
    ],
    ids=["separate", "shared", "no-critic-lstm"],
)
def test_critic_fit_on_sequences_moves_only_critic_parameters(lstm_options, critic_modules, actor_only_modules) -> None:
    env = make_vec_env(lambda: CueRecall(length=5), n_envs=2, seed=0)
    model = RecurrentTRPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=16,
        n_critic_updates=20,
        learning_rate=3e-3,
        policy_kwargs=dict(lstm_hidden_size=8, **lstm_options),
        seed=0,
    )
    names = {id(p): name.split(".")[0] for name, p in model.policy.named_parameters()}
    critic = {names[id(p)] for p in model.critic_parameters}
    actor = {names[id(p)] for p in model.actor_parameters}
    assert critic_modules <= critic and not actor_only_modules & critic
    assert actor_only_modules <= actor
    assert len(model.actor_parameters) + len(model.critic_parameters) == len(list(model.policy.parameters()))

    collected(model)
    model.rollout_buffer.get(batch_size=None)  # flattens the buffer, as the actor step does first
    actor_before, critic_before = actor_vector(model), critic_vector(model)
    model.n_critic_updates = 1
    first_loss = model._fit_critic(1)
    model.n_critic_updates = 20
    model._fit_critic(1)
    model.n_critic_updates = 1
    last_loss = model._fit_critic(1)
    assert th.equal(actor_vector(model), actor_before)
    assert not th.equal(critic_vector(model), critic_before)
    print(f"critic loss {first_loss:.3f} -> {last_loss:.3f}")
    assert last_loss < 0.7 * first_loss


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rollout_buffer_class=RolloutBuffer), "rollout_buffer_class"),
        (dict(target_kl=-1.0), "target_kl"),
        (dict(line_search_max_iter=0), "line_search_max_iter"),
        (dict(cg_max_steps=0), "cg_max_steps"),
        (dict(policy="MlpPolicy"), "MlpPolicy"),
    ],
)
def test_invalid_settings_raise_value_errors(kwargs: dict, message: str) -> None:
    settings = {"policy": "MlpLstmPolicy", "env": CueRecall(), "n_steps": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        RecurrentTRPO(**settings)


def test_multi_input_policy_and_logger_diagnostics() -> None:
    model = RecurrentTRPO("MultiInputLstmPolicy", DictCueRecall(), n_steps=64, policy_kwargs=dict(lstm_hidden_size=8), seed=0)
    logger = recording_logger(model)
    model.learn(128)
    logged = logger.latest
    assert logged["train/is_line_search_success"] == 1.0
    assert 0.0 < logged["train/accepted_kl"] < model.target_kl
    assert 0.0 < logged["train/entropy"] <= np.log(2) + 1e-6
    assert np.isfinite(logged["train/value_loss"])


def test_save_load_round_trip(tmp_path) -> None:
    env = make_vec_env(lambda: CueRecall(length=4), n_envs=2, seed=0)
    model = RecurrentTRPO(
        "MlpLstmPolicy",
        env,
        n_steps=16,
        target_kl=0.02,
        cg_damping=0.05,
        fisher_vector_product="double_backprop",
        policy_kwargs=dict(lstm_hidden_size=8),
        seed=0,
    )
    model.learn(64)
    model.save(tmp_path / "model")
    loaded = RecurrentTRPO.load(tmp_path / "model", env=env)
    assert (loaded.target_kl, loaded.cg_damping, loaded.fisher_vector_product) == (0.02, 0.05, "double_backprop")
    obs = env.reset()
    starts = np.ones(2, dtype=bool)
    state = state_loaded = None
    for _ in range(4):
        action, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        action_loaded, state_loaded = loaded.predict(obs, state=state_loaded, episode_start=starts, deterministic=True)
        assert np.array_equal(action, action_loaded)
        assert np.allclose(state[0], state_loaded[0])
        obs, _, starts, _ = env.step(action)
    loaded.learn(32)
    assert loaded.num_timesteps == 32


class EpisodeSuccess(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.rollouts = 0

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1


@pytest.mark.slow
def test_remembers_the_cue_where_feed_forward_trpo_cannot() -> None:
    """CueRecall(length=6), 4 environments, n_steps=64, 8192 steps, LSTM of 16 units, target_kl=0.03.

    The success rate of the deterministic policy over 200 evaluation episodes after 8192 steps,
    seed 0. A feed-forward policy sees the same observation at the query step whatever the cue,
    so it cannot beat 0.5 in expectation; the recurrent one must solve the task.
    """
    results = {}
    for name in ("RecurrentTRPO", "TRPO"):
        env = make_vec_env(lambda: CueRecall(length=6), n_envs=4, seed=0)
        if name == "RecurrentTRPO":
            model = RecurrentTRPO(
                "MlpLstmPolicy", env, n_steps=64, target_kl=0.03, policy_kwargs=dict(lstm_hidden_size=16), seed=0
            )
        else:
            model = TRPO("MlpPolicy", env, n_steps=64, target_kl=0.03, seed=0)
        callback = EpisodeSuccess()
        model.learn(8192, callback=callback)
        assert callback.rollouts == 32
        eval_env = make_vec_env(lambda: CueRecall(length=6), n_envs=1, seed=1000)
        results[name], _ = evaluate_policy(model, eval_env, n_eval_episodes=200, deterministic=True)
    print(results)
    assert results["RecurrentTRPO"] >= 0.95
    assert results["TRPO"] <= 0.65
