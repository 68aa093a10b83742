"""TRPO and NPG as SB3 algorithms: spaces, options, errors, reproducibility, the actor/critic split."""

from __future__ import annotations

import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
import sb3_contrib
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize
from torch import nn

import sb3_trpo.common.trust_region_algorithm as trust_region_algorithm
from sb3_trpo import NPG, TRPO, NonFiniteError
from sb3_trpo.common.trust_region import ConjugateGradientResult
from tests.helpers import SMALL, actor_vector, all_finite, critic_vector, record_updates, recording_logger


@pytest.mark.parametrize(
    ("policy", "env_fn", "options"),
    [
        ("MlpPolicy", lambda: IdentityEnvBox(ep_length=20), {}),
        ("MlpPolicy", lambda: IdentityEnvBox(ep_length=20), {"use_sde": True, "sde_sample_freq": 4}),
        ("MlpPolicy", lambda: IdentityEnv(4, ep_length=20), {}),
        ("MlpPolicy", lambda: IdentityEnvMultiDiscrete(3, ep_length=20), {}),
        ("MlpPolicy", lambda: IdentityEnvMultiBinary(3, ep_length=20), {}),
        ("CnnPolicy", lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1), {}),
        ("MultiInputPolicy", lambda: SimpleMultiObsEnv(random_start=True), {}),
    ],
    ids=["box", "gsde", "discrete", "multidiscrete", "multibinary", "image", "dict"],
)
@pytest.mark.parametrize("algorithm", [TRPO, NPG])
def test_every_space_trains_and_moves_the_actor(policy: str, env_fn, options: dict, algorithm: type[NPG]) -> None:
    model = algorithm(policy, DummyVecEnv([env_fn, env_fn]), **{**SMALL, **options})
    before = actor_vector(model)
    critic_before = critic_vector(model)
    model.learn(3 * 64 * 2)
    assert all_finite(model)
    assert model._n_updates == 3
    assert not th.equal(before, actor_vector(model))
    assert not th.equal(critic_before, critic_vector(model))
    action, _ = model.predict(model.env.reset(), deterministic=True)
    assert model.env.action_space.contains(action[0])


def test_subprocess_vec_env_and_vec_normalize() -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, vec_env_cls=SubprocVecEnv, seed=0))
    model = TRPO("MlpPolicy", env, **SMALL)
    model.learn(2 * 64 * 2)
    env.close()
    assert model.num_timesteps == 256
    assert all_finite(model)


def test_unsupported_action_space_is_refused_with_its_name() -> None:
    class TupleActionEnv(gym.Env):
        observation_space = spaces.Box(-1, 1, (2,))
        action_space = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3)))

    with pytest.raises(ValueError, match=r"Tuple.*Box, Discrete, MultiDiscrete, MultiBinary"):
        TRPO("MlpPolicy", DummyVecEnv([TupleActionEnv]))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("target_kl", 0.0),
        ("cg_max_steps", 0),
        ("cg_damping", -0.1),
        ("line_search_shrinking_factor", 1.0),
        ("line_search_shrinking_factor", 0.0),
        ("line_search_max_iter", 0),
        ("sub_sampling_factor", 0),
        ("n_critic_updates", -1),
        ("batch_size", 0),
        ("gamma", 0.0),
        ("gamma", 1.5),
        ("gae_lambda", -0.1),
        ("gae_lambda", 1.01),
        ("n_steps", 0),
        ("learning_rate", 0.0),
        ("cg_residual_tol", -1.0),
        ("fisher_vector_product", "exact"),
    ],
)
def test_invalid_hyperparameter_raises_value_error_naming_it(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        TRPO("MlpPolicy", "Pendulum-v1", **{name: value})


def test_single_sample_buffer_with_advantage_normalization_is_refused() -> None:
    with pytest.raises(ValueError, match=r"n_steps \* n_envs must be > 1"):
        TRPO("MlpPolicy", "Pendulum-v1", n_steps=1)
    TRPO("MlpPolicy", "Pendulum-v1", n_steps=1, normalize_advantage=False)


@pytest.mark.parametrize(("n_steps", "n_envs", "batch_size"), [(64, 1, 256), (32, 2, 128), (100, 1, 64)])
def test_batch_size_not_dividing_the_rollout_warns_as_sb3_contrib(n_steps: int, n_envs: int, batch_size: int) -> None:
    options = dict(n_steps=n_steps, batch_size=batch_size)
    with pytest.warns(UserWarning, match=f"mini-batch size of {batch_size}") as ours:
        TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=n_envs), **options)
    with pytest.warns(UserWarning) as theirs:
        sb3_contrib.TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=n_envs), **options)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=n_envs), n_steps=n_steps, batch_size=n_steps * n_envs)


class NaNRewardAfter(gym.Wrapper):
    def __init__(self, env: gym.Env, steps: int, value: float = float("nan"), in_observation: bool = False):
        super().__init__(env)
        self.steps, self.value, self.in_observation, self.count = steps, value, in_observation, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.count += 1
        if self.count > self.steps:
            if self.in_observation:
                obs = np.full_like(obs, self.value)
            else:
                reward = self.value
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize(
    ("value", "in_observation", "what"), [(float("nan"), False, "rewards"), (float("inf"), True, "observations")]
)
def test_non_finite_rollout_stops_training_with_weights_untouched(value: float, in_observation: bool, what: str) -> None:
    env = DummyVecEnv([lambda: NaNRewardAfter(gym.make("Pendulum-v1"), 64 + 10, value, in_observation)])
    model = TRPO("MlpPolicy", env, **SMALL)
    model.learn(64)  # the first update sees finite data
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(NonFiniteError, match=rf"non-finite {what} in the rollout of update 2"):
        model.learn(64, reset_num_timesteps=False)
    assert all(th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_non_finite_search_direction_skips_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    records = recording_logger(model).latest

    def broken(*args, **kwargs):
        solution = th.full_like(args[1], float("nan"))
        return ConjugateGradientResult(solution, float("nan"), 1)

    monkeypatch.setattr(trust_region_algorithm, "conjugate_gradient", broken)
    actor_before = actor_vector(model)
    model.learn(64)
    assert th.equal(actor_before, actor_vector(model))
    assert all_finite(model)
    assert records["train/skipped_update"] == 1.0
    assert records["train/is_line_search_success"] == 0.0


def test_failed_line_search_restores_the_exact_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    real = trust_region_algorithm.conjugate_gradient

    def uphill(*args, **kwargs):
        result = real(*args, **kwargs)
        return ConjugateGradientResult(-result.solution, result.residual_norm, result.n_iterations)

    monkeypatch.setattr(trust_region_algorithm, "conjugate_gradient", uphill)
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    records = recording_logger(model).latest
    actor_before = actor_vector(model)
    model.learn(64)
    assert records["train/is_line_search_success"] == 0.0
    assert records["train/line_search_backtracks"] == model.line_search_max_iter
    assert th.equal(actor_before, actor_vector(model))


def test_same_seed_gives_bitwise_identical_parameters() -> None:
    def run() -> list[th.Tensor]:
        model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
        model.learn(4 * 64)
        return [p.detach().clone() for p in model.policy.parameters()]

    first, second = run(), run()
    assert all(th.equal(a, b) for a, b in zip(first, second, strict=True))
    other = TRPO("MlpPolicy", "Pendulum-v1", **{**SMALL, "seed": 1}).learn(4 * 64)
    assert not th.equal(first[0], next(other.policy.parameters()))


def test_logger_records_sb3_contrib_keys_and_diagnostics() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    records = recording_logger(model).latest
    model.learn(2 * 64)
    for key in [
        "train/policy_objective",
        "train/kl_divergence_loss",
        "train/is_line_search_success",
        "train/value_loss",
        "train/explained_variance",
        "train/std",
        "train/accepted_kl",
        "train/line_search_backtracks",
        "train/cg_residual",
        "train/expected_improvement",
        "train/actual_improvement",
        "train/step_norm",
        "train/entropy",
        "train/max_step_size",
    ]:
        assert key in records, key
    # Seeded: the second update's line search succeeds.
    assert records["train/is_line_search_success"] == 1.0
    assert 0 < records["train/accepted_kl"] < model.target_kl
    assert records["train/actual_improvement"] > 0
    assert records["train/std"] == pytest.approx(th.exp(model.policy.log_std.detach()).mean().item())


def test_npg_measured_kl_is_close_to_target_kl() -> None:
    """On CartPole the quadratic KL model holds for a small radius: the KL of the full step is target_kl's."""
    model = NPG(
        "MlpPolicy", "CartPole-v1", n_steps=256, cg_max_steps=50, cg_damping=1e-4, cg_residual_tol=0.0, target_kl=1e-4, seed=0
    )
    records = recording_logger(model).latest
    model.learn(256)
    assert records["train/max_step_size"] > 0
    assert records["train/accepted_kl"] == pytest.approx(model.target_kl, rel=0.15)
    assert records["train/line_search_backtracks"] == 0


class FoolingPolicy(ActorCriticPolicy):
    """The action head is called ``value_action_net`` and the critic head ``critic_head``: a name filter fails."""

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.value_action_net = self._modules.pop("action_net")
        self.critic_head = self._modules.pop("value_net")
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    @property
    def action_net(self) -> nn.Module:
        return self.value_action_net

    @property
    def value_net(self) -> nn.Module:
        return self.critic_head


def test_split_follows_structure_not_names() -> None:
    model = TRPO(FoolingPolicy, "Pendulum-v1", **SMALL)
    actor_names = {n for n, p in model.policy.named_parameters() if any(p is a for a in model.actor_parameters)}
    critic_names = {n for n, p in model.policy.named_parameters() if any(p is c for c in model.critic_parameters)}
    assert {"value_action_net.weight", "value_action_net.bias", "log_std"} <= actor_names
    assert {"critic_head.weight", "critic_head.bias"} <= critic_names
    assert not actor_names & critic_names
    head_before = model.policy.value_action_net.weight.detach().clone()
    model.learn(2 * 64)
    assert not th.equal(head_before, model.policy.value_action_net.weight)


class LinearExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: spaces.Box):
        super().__init__(observation_space, features_dim=8)
        self.linear = nn.Linear(int(np.prod(observation_space.shape)), 8)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.tanh(self.linear(observations))


def test_critic_fit_never_moves_a_shared_features_extractor() -> None:
    kwargs = dict(features_extractor_class=LinearExtractor, share_features_extractor=True, net_arch=[16])
    model = TRPO("MlpPolicy", "Pendulum-v1", **{**SMALL, "policy_kwargs": kwargs})
    extractor = model.policy.features_extractor.linear.weight
    assert any(extractor is p for p in model.actor_parameters)
    assert not any(extractor is p for p in model.critic_parameters)
    model.learn(64)
    actor_before, critic_before = actor_vector(model), critic_vector(model)
    model._fit_critic(update=2)
    model.finish_critic_fit()  # the fit may run in the background (the default)
    assert th.equal(actor_before, actor_vector(model))
    assert not th.equal(critic_before, critic_vector(model))


def test_critic_learning_rate_follows_schedule() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **{**SMALL, "learning_rate": lambda progress: 1e-3 * (0.5 + progress)})
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-3)
    model.learn(4 * 64)
    # SB3 updates the progress after each rollout: the last update ran with none of the budget left.
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_save_load_and_continue(tmp_path) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL).learn(64)
    model.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", env=make_vec_env("Pendulum-v1"))
    assert all(th.equal(a, b) for a, b in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True))
    assert loaded.target_kl == model.target_kl and loaded.n_steps == 64
    # The split survives loading, so the next update moves the actor.
    before = actor_vector(loaded)
    loaded.learn(64, reset_num_timesteps=False)
    assert not th.equal(before, actor_vector(loaded))
    params = loaded.get_parameters()
    fresh = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    fresh.set_parameters(params)
    assert th.equal(actor_vector(fresh), actor_vector(loaded))


def test_model_saved_by_sb3_contrib_loads_and_keeps_training(tmp_path) -> None:
    reference = sb3_contrib.TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0).learn(64)
    reference.save(tmp_path / "contrib")
    loaded = TRPO.load(tmp_path / "contrib", env=make_vec_env("Pendulum-v1"))
    assert all(th.equal(a, b) for a, b in zip(reference.policy.parameters(), loaded.policy.parameters(), strict=True))
    before = actor_vector(loaded)
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 192
    assert not th.equal(before, actor_vector(loaded))


def test_callbacks_progress_bar_and_tensorboard(tmp_path) -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0))
    eval_env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=5), training=False)
    model = TRPO("MlpPolicy", env, tensorboard_log=str(tmp_path / "tb"), **SMALL)
    evaluation = EvalCallback(eval_env, eval_freq=64, n_eval_episodes=1, log_path=str(tmp_path / "eval"))
    checkpoints = CheckpointCallback(save_freq=64, save_path=str(tmp_path / "ckpt"))
    model.learn(2 * 128, callback=[evaluation, checkpoints], progress_bar=True)
    assert evaluation.n_calls == 128
    assert len(np.load(tmp_path / "eval" / "evaluations.npz")["results"]) == 2
    assert len(os.listdir(tmp_path / "ckpt")) == 2
    runs = os.listdir(tmp_path / "tb")
    assert runs == ["TRPO_1"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb" / "TRPO_1"))


def test_progress_bar_warns_nothing_the_user_did_not_cause() -> None:
    """pytest resets the filter with which SB3 hides tqdm.rich's TqdmExperimentalWarning on import."""
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        model.learn(64, progress_bar=True)
        assert warnings.filters == filters  # the user's filters, as they were
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_set_env_switches_environment() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    other = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=9))
    model.set_env(other)
    model.learn(64)
    assert model.get_env() is other
    assert other.obs_rms.count > 64


def test_logged_objective_and_kl_are_the_accepted_policys_on_the_batch() -> None:
    """Surrogate ``mean(A * pi_new(a|s) / pi_old(a|s))`` and KL, recomputed from the policy after the update."""
    model = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    updates = record_updates(model)
    records = recording_logger(model).latest
    model.learn(64)
    (update,) = updates
    assert records["train/is_line_search_success"] == 1.0
    batch = update.batch
    with th.no_grad():
        log_prob = model.policy.get_distribution(batch.observations).log_prob(batch.actions)
        objective = float((batch.advantages * th.exp(log_prob - batch.old_log_prob)).mean())
    assert records["train/policy_objective"] == pytest.approx(objective, rel=1e-5)
    # Before the step every ratio is 1: the surrogate was the mean advantage.
    before = float(batch.advantages.mean())
    assert records["train/actual_improvement"] == pytest.approx(objective - before, rel=1e-5)
    assert records["train/kl_divergence_loss"] == pytest.approx(update.kl, rel=1e-4)
    assert records["train/accepted_kl"] == pytest.approx(update.kl, rel=1e-4)


def test_background_critic_fit_gives_the_sequential_weights_and_optimizer_state(tmp_path) -> None:
    def run(background: bool) -> TRPO:
        model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=background, **SMALL)
        records = recording_logger(model).latest
        model.learn(3 * 64)
        assert records["train/value_loss"] > 0
        return model

    sequential, background = run(False), run(True)
    worker = background.critic_fitter.worker
    assert worker is not None and worker.alive
    os.kill(worker.pid, 0)  # the worker process runs: ProcessLookupError otherwise
    for a, b in zip(sequential.policy.parameters(), background.policy.parameters(), strict=True):
        assert th.equal(a, b)
    states = sequential.policy.optimizer.state_dict()["state"], background.policy.optimizer.state_dict()["state"]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert all(th.equal(states[0][key][name], states[1][key][name]) for name in states[0][key])
    # Saved and loaded, the model trains on (with a new worker) and matches the sequential one again.
    background.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", env=make_vec_env("Pendulum-v1"))
    assert loaded.background_critic_fit
    assert all(th.equal(a, b) for a, b in zip(loaded.policy.parameters(), background.policy.parameters(), strict=True))
    background.critic_fitter.close()


def test_zero_critic_updates_leave_the_critic_unchanged() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", **{**SMALL, "n_critic_updates": 0})
    critic_before, actor_before = critic_vector(model), actor_vector(model)
    model.learn(2 * 64)
    assert th.equal(critic_before, critic_vector(model))
    assert not th.equal(actor_before, actor_vector(model))
