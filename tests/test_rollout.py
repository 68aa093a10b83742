"""The lean rollout fills the buffer exactly as SB3's ``OnPolicyAlgorithm.collect_rollouts`` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete, SimpleMultiObsEnv
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

from sb3_trpo import TRPO
from sb3_trpo.common.rollout import _numpy_gaussian_mlp, action_sampler

SEED = 3


def _identity(env_class):
    """Two of SB3's identity environments; they draw their states from their action space's generator."""

    def make():
        env = env_class(3, ep_length=20)
        env.action_space.seed(0)
        return env

    return make_vec_env(make, n_envs=2)


def _rollout(model: TRPO, collect) -> RolloutBuffer:
    _, callback = model._setup_learn(10**6, None)
    callback.on_training_start(locals(), globals())
    th.manual_seed(SEED)
    assert collect(model, model.env, callback, model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


def _pair(env_fn, policy: str, **options) -> tuple[RolloutBuffer, RolloutBuffer]:
    buffers = []
    for collect in (TRPO.collect_rollouts, OnPolicyAlgorithm.collect_rollouts):
        np.random.seed(0)  # SimpleMultiObsEnv draws its images from numpy's global generator
        model = TRPO(policy, env_fn(), seed=0, **options)
        buffers.append(_rollout(model, collect))
    return buffers[0], buffers[1]


def _fields(buffer: RolloutBuffer) -> dict[str, np.ndarray]:
    fields = {
        name: getattr(buffer, name)
        for name in ("actions", "rewards", "episode_starts", "values", "log_probs", "advantages", "returns")
    }
    observations = buffer.observations
    for key, value in observations.items() if isinstance(observations, dict) else [("observations", observations)]:
        fields[f"obs:{key}"] = value
    return fields


def _image_env() -> FakeImageEnv:
    """Small uint8 images (which SB3 scales to [0, 1]), drawn from the observation space's generator."""
    env = FakeImageEnv(screen_height=8, screen_width=8, discrete=False)
    env.observation_space.seed(0)
    return env


@pytest.mark.parametrize(
    ("env_fn", "policy", "options"),
    [
        # Pendulum's 200-step time limit truncates episodes inside the 256-step rollout.
        (lambda: VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0)), "MlpPolicy", dict(n_steps=256)),
        (lambda: make_vec_env("CartPole-v1", n_envs=2, seed=0), "MlpPolicy", dict(n_steps=128)),
        (lambda: _identity(IdentityEnvMultiDiscrete), "MlpPolicy", dict(n_steps=64)),
        (lambda: _identity(IdentityEnvMultiBinary), "MlpPolicy", dict(n_steps=64)),
        (lambda: make_vec_env(lambda: SimpleMultiObsEnv(random_start=True), n_envs=2), "MultiInputPolicy", dict(n_steps=64)),
        (
            lambda: make_vec_env("Pendulum-v1", n_envs=2, seed=0),
            "MlpPolicy",
            dict(n_steps=256, use_sde=True, sde_sample_freq=8),
        ),
        (
            lambda: make_vec_env("Pendulum-v1", n_envs=2, seed=0),
            "MlpPolicy",
            dict(n_steps=64, policy_kwargs=dict(share_features_extractor=False)),
        ),
        (
            lambda: make_vec_env("Pendulum-v1", n_envs=2, seed=0),
            "MlpPolicy",
            dict(n_steps=64, policy_kwargs=dict(activation_fn=nn.ReLU, net_arch=[32, 16])),
        ),
        (
            lambda: make_vec_env(_image_env, n_envs=2),
            "MlpPolicy",
            dict(n_steps=32),
        ),
    ],
    ids=["gaussian-truncations", "categorical", "multicategorical", "bernoulli", "dict", "gsde", "unshared", "relu", "image"],
)
def test_rollout_fills_the_buffer_as_sb3_does(env_fn, policy: str, options: dict) -> None:
    ours, sb3 = _pair(env_fn, policy, **options)
    assert ours.pos == sb3.pos and ours.full and sb3.full
    ours_fields, sb3_fields = _fields(ours), _fields(sb3)
    # The NumPy copy of a Gaussian MLP actor rounds its mean differently in the last bit;
    # everything else is drawn exactly as SB3 draws it.
    for name in ("actions", "episode_starts", *(k for k in sb3_fields if k.startswith("obs:"))):
        np.testing.assert_allclose(ours_fields[name], sb3_fields[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # Batched and per-step forward passes round differently in the last bits.
    for name in ("rewards", "values", "log_probs", "advantages", "returns"):
        np.testing.assert_allclose(ours_fields[name], sb3_fields[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_pendulum_case_holds_truncations() -> None:
    """The Pendulum case above checks the truncation bootstraps only if its rollout holds some."""
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=256, seed=0)
    buffer = _rollout(model, TRPO.collect_rollouts)
    # 200-step episodes: both environments were truncated after step 199 and restarted.
    assert buffer.episode_starts[200].all() and buffer.episode_starts[1:200].sum() == 0


def test_actor_forward_hooks_are_honoured() -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=32, seed=0)
    calls = []
    handle = model.policy.action_net.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    try:
        _rollout(model, TRPO.collect_rollouts)
    finally:
        handle.remove()
    # One call per step, plus the batched pass over the buffer for log-probabilities.
    assert calls.count(th.Size([2, 1])) == 32


@pytest.mark.parametrize("n_observations", [5, 40])  # torch draws blocks of 16 normals differently
def test_sampler_draws_sb3_policy_actions(n_observations: int) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", seed=0)
    observations = th.randn(n_observations, 3)
    sample = action_sampler(model.policy, model.action_space.shape)
    th.manual_seed(7)
    with th.no_grad():
        expected, _, _ = model.policy(observations)
    th.manual_seed(7)
    actions = sample(observations.numpy())
    # Other draws would differ by about std (1 here); float32 rounding of the mean by 1e-7.
    np.testing.assert_allclose(actions, expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("policy_kwargs", "numpy_path"),
    [
        ({}, True),
        (dict(activation_fn=nn.ReLU), True),
        (dict(share_features_extractor=False), True),
        (dict(activation_fn=nn.ELU), False),
        (dict(use_expln=True), True),  # only used with gSDE
    ],
)
def test_numpy_actor_is_used_exactly_for_sb3_mlp_gaussian_actors(policy_kwargs: dict, numpy_path: bool) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", policy_kwargs=policy_kwargs, seed=0)
    assert (_numpy_gaussian_mlp(model.policy) is not None) is numpy_path
    handle = model.policy.mlp_extractor.policy_net[0].register_forward_pre_hook(lambda module, inputs: None)
    assert _numpy_gaussian_mlp(model.policy) is None
    handle.remove()
    assert _numpy_gaussian_mlp(TRPO("MlpPolicy", "Pendulum-v1", use_sde=True).policy) is None
    assert _numpy_gaussian_mlp(TRPO("MlpPolicy", "CartPole-v1").policy) is None


def test_sampler_gives_actions_in_the_shape_of_a_matrix_action_space() -> None:
    observation_space = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, (2, 2), dtype=np.float32)
    policy = ActorCriticPolicy(observation_space, action_space, lambda _: 1e-3)
    assert _numpy_gaussian_mlp(policy) is not None
    observations = th.randn(5, 3)
    th.manual_seed(7)
    with th.no_grad():
        expected, _, _ = policy(observations)
    th.manual_seed(7)
    actions = action_sampler(policy, action_space.shape)(observations.numpy())
    assert actions.shape == (5, 2, 2)
    np.testing.assert_allclose(actions, expected.reshape(5, 2, 2).numpy(), rtol=0, atol=1e-6)
