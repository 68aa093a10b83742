"""ACKTR as an SB3 algorithm: validation, the K-FAC trust-region step, saved factor state, non-finite data, learning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import yaml
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

import sb3_trpo
from sb3_trpo import ACKTR, NonFiniteError
from tests.test_algorithm import NaNRewardAfter

CONFIG = Path(sb3_trpo.__file__).parent / "zoo_configs" / "acktr.yml"
SMALL: dict[str, Any] = dict(n_steps=64, batch_size=32, n_critic_updates=2, seed=0, policy_kwargs=dict(net_arch=[16]))


def vector(parameters: list[nn.Parameter]) -> th.Tensor:
    return th.cat([p.detach().flatten() for p in parameters]).clone()


def recording(model: ACKTR) -> dict[str, float]:
    """What the model's last update logged (SB3 dumps before ``train()``, so the values stay until the next rollout)."""
    logger = Logger(folder=None, output_formats=[])
    model.set_logger(logger)
    return logger.name_to_value


@pytest.mark.parametrize(
    ("policy", "env_fn"),
    [
        ("MlpPolicy", lambda: IdentityEnvBox(ep_length=20)),
        ("MlpPolicy", lambda: IdentityEnv(4, ep_length=20)),
        ("MlpPolicy", lambda: IdentityEnvMultiDiscrete(3, ep_length=20)),
        ("MlpPolicy", lambda: IdentityEnvMultiBinary(3, ep_length=20)),
        ("CnnPolicy", lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1)),
        ("MultiInputPolicy", lambda: SimpleMultiObsEnv(random_start=True)),
    ],
    ids=["box", "discrete", "multidiscrete", "multibinary", "image", "dict"],
)
def test_every_space_trains_actor_and_critic(policy: str, env_fn) -> None:
    model = ACKTR(policy, DummyVecEnv([env_fn, env_fn]), **SMALL)
    actor, critic = vector(model.actor_parameters), vector(model.critic_parameters)
    model.learn(2 * 64 * 2)
    assert model._n_updates == 2
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert not th.equal(actor, vector(model.actor_parameters))
    assert not th.equal(critic, vector(model.critic_parameters))


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("max_lr", 0.0, "> 0"),
        ("ent_coef", -0.1, ">= 0"),
        ("kfac_damping", 0.0, "> 0"),
        ("kfac_decay", 1.0, "in [0, 1)"),
        ("inverse_update_interval", 0, ">= 1"),
        ("critic_target_kl", -1.0, "> 0"),
        ("use_sde", True, "False"),
        ("target_kl", 0.0, "> 0"),
        ("gamma", 1.5, "in (0, 1]"),
        ("gae_lambda", -0.1, "in [0, 1]"),
        ("n_steps", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("n_critic_updates", -1, ">= 0"),
        ("learning_rate", 0.0, "> 0"),
    ],
)
def test_bad_hyperparameter_is_refused_at_construction(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be {__import__('re').escape(allowed)}"):
        ACKTR("MlpPolicy", "Pendulum-v1", **{name: value})


class NormalizedFeatures(BaseFeaturesExtractor):
    def __init__(self, observation_space: gym.spaces.Box):
        super().__init__(observation_space, features_dim=3)
        self.norm = nn.LayerNorm(3)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.norm(observations)


def test_parameters_outside_kfac_layers_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"features_extractor.norm.weight.*no nn.Linear or nn.Conv2d"):
        ACKTR("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(features_extractor_class=NormalizedFeatures))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_unclipped_step_has_model_kl_target_kl_and_measured_kl_near_it(env_id: str) -> None:
    # One layer between observation and distribution: K-FAC's only approximation is the Kronecker one.
    model = ACKTR("MlpPolicy", env_id, n_steps=512, target_kl=0.01, max_lr=1e3, seed=0, policy_kwargs=dict(net_arch=[]))
    records = recording(model)
    for _ in range(3):
        model.learn(512, reset_num_timesteps=False)
        assert records["train/step_size"] < 1e3
        assert records["train/model_kl"] == pytest.approx(0.01, rel=1e-6)
        assert 0.005 < records["train/kl"] < 0.02


def test_hidden_layers_measured_kl_is_reported() -> None:
    model = ACKTR("MlpPolicy", "CartPole-v1", n_steps=512, target_kl=0.01, max_lr=1e3, kfac_decay=0.0, seed=0)
    records = recording(model)
    ratios = []
    for _ in range(3):
        model.learn(512, reset_num_timesteps=False)
        ratios.append(records["train/kl"] / records["train/model_kl"])
    print(f"two tanh layers of 64: measured KL over model KL {np.round(ratios, 2).tolist()}")
    assert all(0.5 < ratio < 10 for ratio in ratios)


def test_max_lr_caps_the_step() -> None:
    model = ACKTR("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=256, target_kl=10.0, max_lr=1e-3, seed=0)
    records = recording(model)
    model.learn(256)
    assert records["train/step_size"] == 1e-3
    assert records["train/model_kl"] < 10.0


def test_save_load_keeps_the_factor_state(tmp_path: Path) -> None:
    model = ACKTR("MlpPolicy", "Pendulum-v1", **SMALL)
    model.learn(3 * 64)
    model.save(tmp_path / "model.zip")
    loaded = ACKTR.load(tmp_path / "model.zip")
    for original, restored in [(model.actor_factors, loaded.actor_factors), (model.critic_factors, loaded.critic_factors)]:
        assert original is not None and restored is not None
        assert restored.n_updates == original.n_updates > 0
        assert list(restored.layers) == list(original.layers)
        for name, state in original.layers.items():
            for field in ("a", "g", "a_inverse", "g_inverse"):
                assert th.equal(getattr(restored.layers[name], field), getattr(state, field))
    assert (loaded.kfac_decay, loaded.kfac_damping, loaded.max_lr) == (model.kfac_decay, model.kfac_damping, model.max_lr)
    # The loaded model's next update starts from the saved factors, not from new ones.
    gradient = {name: th.ones_like(state.a[:1, :1]).expand(state.g.shape[0], state.a.shape[0])
                for name, state in model.actor_factors.layers.items()}
    assert all(th.equal(a, b) for a, b in zip(model.actor_factors.natural_step(gradient).values(),
                                               loaded.actor_factors.natural_step(gradient).values(), strict=True))
    loaded.set_env(make_vec_env("Pendulum-v1"))
    loaded.learn(64)
    assert loaded.actor_factors.n_updates == model.actor_factors.n_updates + 1


@pytest.mark.parametrize(
    ("value", "in_observation", "what"), [(float("nan"), False, "rewards"), (float("inf"), True, "observations")]
)
def test_non_finite_rollout_stops_training_with_weights_and_factors_untouched(
    value: float, in_observation: bool, what: str
) -> None:
    env = DummyVecEnv([lambda: NaNRewardAfter(gym.make("Pendulum-v1"), 64 + 10, value, in_observation)])
    model = ACKTR("MlpPolicy", env, **SMALL)
    model.learn(64)
    before = [p.detach().clone() for p in model.policy.parameters()]
    factor_updates = model.actor_factors.n_updates
    with pytest.raises(NonFiniteError, match=rf"non-finite {what} in the rollout of update 2"):
        model.learn(64, reset_num_timesteps=False)
    assert all(th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))
    assert model.actor_factors.n_updates == factor_updates


@pytest.mark.parametrize(
    ("field", "guard"),
    [("observations", "actor gradient or curvature"), ("advantages", "actor step")],
)
def test_overflow_in_the_update_is_stopped_before_the_weights(field: str, guard: str) -> None:
    # Huge but finite rollout data pass the rollout check and overflow inside the update.
    model = ACKTR("MlpPolicy", "Pendulum-v1", **SMALL)
    model.learn(64)
    before = [p.detach().clone() for p in model.policy.parameters()]
    getattr(model.rollout_buffer, field)[:] = 3e38
    model.normalize_advantage = False
    with pytest.raises(NonFiniteError, match=f"non-finite {guard} in update 2; the weights were not changed"):
        model.train()
    assert all(th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_exported_from_the_package() -> None:
    assert sb3_trpo.ACKTR is ACKTR
    assert "ACKTR" in sb3_trpo.__all__


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_sampled_hyperparameters_build_a_model(env_id: str) -> None:
    import optuna

    from sb3_trpo.hyperparams import sample_acktr_params

    n_actions = 1 if env_id == "Pendulum-v1" else 0
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = sample_acktr_params(trial, n_actions, 1, {})
        model = ACKTR("MlpPolicy", env_id, **params)
        assert model.target_kl == params["target_kl"] and model.max_lr == params["max_lr"]
        study.tell(trial, 0.0)


def test_registered_with_rl_zoo3() -> None:
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER
    from rl_zoo3.utils import ALGOS

    from sb3_trpo import zoo
    from sb3_trpo.hyperparams import sample_acktr_params

    assert "acktr" in zoo.register()
    assert ALGOS["acktr"] is ACKTR and HYPERPARAMS_SAMPLER["acktr"] is sample_acktr_params
    assert (zoo.CONFIG_DIR / zoo.ZOO_ALGORITHMS["acktr"].config) == CONFIG


# ------------------------------------------------------------------ learning (slow)
def train_and_evaluate(env_id: str, seed: int) -> float:
    """Train with the packaged zoo entry, then 10 deterministic evaluation episodes."""
    settings = dict(yaml.safe_load(CONFIG.read_text())[env_id])
    n_envs, n_timesteps = settings.pop("n_envs", 1), int(settings.pop("n_timesteps"))
    policy = settings.pop("policy")
    if "policy_kwargs" in settings:
        settings["policy_kwargs"] = eval(settings["policy_kwargs"], {"nn": nn})
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    model = ACKTR(policy, env, seed=seed, **settings)
    model.learn(n_timesteps)
    mean_return, _ = evaluate_policy(model, make_vec_env(env_id, n_envs=1, seed=seed + 1000), n_eval_episodes=10)
    print(f"{env_id} seed {seed}: mean return {mean_return:.1f} over 10 deterministic episodes")
    return float(mean_return)


@pytest.mark.slow
def test_cartpole_is_solved_within_100k_steps() -> None:
    assert train_and_evaluate("CartPole-v1", seed=0) >= 475.0


@pytest.mark.slow
def test_pendulum_beats_minus_200_within_100k_steps() -> None:
    assert train_and_evaluate("Pendulum-v1", seed=0) >= -200.0
