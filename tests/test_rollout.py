"""Our rollout leaves what SB3's ``OnPolicyAlgorithm.collect_rollouts`` leaves, bitwise where it drives the trajectory.

Each case runs SB3's own ``collect_rollouts`` and ours on a model built from the same seed,
with the same environment seeds and torch generator state, and compares everything the
rollout leaves behind: actions, observations, rewards and episode starts to the bit; values,
log-probabilities, advantages and returns (which our batched pass rounds differently) to a
relative 1e-6 of the field's scale; the step counter, the last observation, the info buffer,
the training mode and BatchNorm's running statistics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, StopTrainingOnMaxEpisodes
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete, SimpleMultiObsEnv
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnvWrapper, VecNormalize
from torch import nn

import sb3_trpo
from sb3_trpo import NPG, TRPO, MaskableTRPO, RecurrentTRPO
from sb3_trpo.common import rollout_gate
from sb3_trpo.common.exact_sampler import (
    ELEMENTWISE_GRAIN_SIZE,
    action_sampler,
    gaussian_mlp_sampler,
    one_thread_gives_the_same_bits,
)
from sb3_trpo.common.native import mkl_thread_setter
from sb3_trpo.common.policies import split_actor_critic
from sb3_trpo.common.rollout_gate import batched_rollout_sampler
from sb3_trpo.tuning.signals import SignalStop, SignalStopCallback

SEED = 3


# ------------------------------------------------------------------ environments, policies, callbacks
def _identity(env_class: type[gym.Env]) -> Callable[[], Any]:
    """Two of SB3's identity environments; they draw their states from their action space's generator."""

    def make() -> gym.Env:
        env = env_class(3, ep_length=20)
        env.action_space.seed(0)
        return env

    return lambda: make_vec_env(make, n_envs=2)


def _image_env(size: int) -> Callable[[], gym.Env]:
    """uint8 images (which SB3 scales to [0, 1]), drawn from the observation space's generator."""

    def make() -> gym.Env:
        env = FakeImageEnv(screen_height=size, screen_width=size, discrete=False)
        env.observation_space.seed(0)
        return env

    return make


def _pendulum(n_envs: int = 2) -> Any:
    return make_vec_env("Pendulum-v1", n_envs=n_envs, seed=0)


class InfosOnlyAtEpisodeEnds(VecEnvWrapper):
    """A VecEnv that returns an empty ``infos`` list on steps where no episode ends (SB3 indexes it only where done)."""

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        observations, rewards, dones, infos = self.venv.step_wait()
        return observations, rewards, dones, infos if dones.any() else []


class ShiftedValues(ActorCriticPolicy):
    """A policy whose ``forward`` returns other values than ``predict_values``."""

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        actions, values, log_prob = super().forward(obs, deterministic)
        return actions, values + 1.0, log_prob


class BatchNormDropout(BaseFeaturesExtractor):
    """A features extractor with running statistics (BatchNorm) and random masks (Dropout) in train mode."""

    def __init__(self, observation_space: spaces.Space, features_dim: int = 16):
        super().__init__(observation_space, features_dim)
        n_inputs = int(np.prod(observation_space.shape)) if observation_space.shape else int(observation_space.n)  # type: ignore[attr-defined]
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(n_inputs, features_dim), nn.BatchNorm1d(features_dim), nn.Tanh(), nn.Dropout(0.2)
        )

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.net(observations)


class StopAt(BaseCallback):
    """A user callback that stops training at its ``step``-th call."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        return self.n_calls < self.step


class EditWeightsAt(BaseCallback):
    """A user callback that changes the actor's and the critic's weights at its ``step``-th call."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        if self.n_calls == self.step:
            policy = self.model.policy
            policy.log_std.data.fill_(-1.0)  # type: ignore[operator]
            parameters = self.model.get_parameters()
            parameters["policy"]["value_net.bias"] += 3.0
            self.model.set_parameters(parameters)
        return True


def _batch_norm_statistics(model: TRPO) -> list[th.Tensor]:
    return [buffer.clone() for buffer in model.policy.buffers()]


# ------------------------------------------------------------------ running both loops
class Run(NamedTuple):
    model: TRPO
    returned: bool  # what collect_rollouts returned
    batched: bool  # whether the batched loop ran
    callback_calls: int


def _run(collect, case: dict) -> Run:
    """Build the case's model and run ``collect`` on it."""
    np.random.seed(0)  # SimpleMultiObsEnv draws its images from numpy's global generator
    model = TRPO(case.get("policy", "MlpPolicy"), case["env"](), seed=0, **case.get("options", {}))
    case.get("prepare", lambda model: None)(model)
    callback_fn = case.get("callback")
    _, callback = model._setup_learn(10**6, None if callback_fn is None else callback_fn())
    callback.on_training_start(locals(), globals())
    batched = batched_rollout_sampler(model.policy, model.rollout_buffer) is not None
    th.manual_seed(SEED)
    returned = collect(model, model.env, callback, model.rollout_buffer, model.n_steps)
    return Run(model, returned, batched, callback.n_calls)


EXACT = ("actions", "rewards", "episode_starts")
ROUNDED = ("values", "log_probs", "advantages", "returns")


def _observation_fields(buffer: RolloutBuffer) -> dict[str, np.ndarray]:
    observations = buffer.observations
    return {
        f"obs:{key}": value
        for key, value in (observations.items() if isinstance(observations, dict) else [("", observations)])
    }


def _assert_same_rollout(ours: TRPO, sb3: TRPO) -> None:
    a, b = ours.rollout_buffer, sb3.rollout_buffer
    assert (a.pos, a.full) == (b.pos, b.full)
    for name, value in {**{name: getattr(b, name) for name in EXACT}, **_observation_fields(b)}.items():
        mine = _observation_fields(a)[name] if name.startswith("obs:") else getattr(a, name)
        assert np.array_equal(mine, value), name
    for name in ROUNDED:
        expected = getattr(b, name)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(getattr(a, name), expected, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
    assert ours.num_timesteps == sb3.num_timesteps
    last_ours, last_sb3 = ours._last_obs, sb3._last_obs
    for key in last_sb3 if isinstance(last_sb3, dict) else [None]:
        assert np.array_equal(last_ours if key is None else last_ours[key], last_sb3 if key is None else last_sb3[key])  # type: ignore[index]
    assert np.array_equal(ours._last_episode_starts, sb3._last_episode_starts)  # type: ignore[arg-type]
    # Monitor's episode records without their wall-clock time "t".
    episodes = [[(info["r"], info["l"]) for info in model.ep_info_buffer] for model in (ours, sb3)]  # type: ignore[union-attr]
    assert episodes[0] == episodes[1]
    assert ours.policy.training is sb3.policy.training
    assert all(
        th.equal(x, y) for x, y in zip(ours.policy.state_dict().values(), sb3.policy.state_dict().values(), strict=True)
    )


CASES: dict[str, dict] = {
    # Pendulum's 200-step time limit truncates both episodes inside the 256-step rollout.
    "box-vecnormalize-truncations": dict(env=lambda: VecNormalize(_pendulum()), options=dict(n_steps=256), batched=True),
    "discrete": dict(env=lambda: make_vec_env("CartPole-v1", n_envs=2, seed=0), options=dict(n_steps=128), batched=True),
    "multidiscrete": dict(env=_identity(IdentityEnvMultiDiscrete), options=dict(n_steps=64), batched=True),
    "multibinary": dict(env=_identity(IdentityEnvMultiBinary), options=dict(n_steps=64), batched=True),
    "dict": dict(
        env=lambda: make_vec_env(lambda: SimpleMultiObsEnv(random_start=True), n_envs=2),
        policy="MultiInputPolicy",
        options=dict(n_steps=64),
        batched=True,
    ),
    "cnn-images": dict(
        env=lambda: make_vec_env(_image_env(36), n_envs=2), policy="CnnPolicy", options=dict(n_steps=16), batched=True
    ),
    "mlp-images": dict(env=lambda: make_vec_env(_image_env(8), n_envs=2), options=dict(n_steps=32), batched=True),
    "gsde": dict(env=_pendulum, options=dict(n_steps=256, use_sde=True, sde_sample_freq=8), batched=True),
    "gsde-squash-output": dict(
        env=_pendulum, options=dict(n_steps=64, use_sde=True, policy_kwargs=dict(squash_output=True)), batched=True
    ),
    "unshared-extractor": dict(
        env=_pendulum, options=dict(n_steps=64, policy_kwargs=dict(share_features_extractor=False)), batched=True
    ),
    "relu": dict(
        env=_pendulum, options=dict(n_steps=64, policy_kwargs=dict(activation_fn=nn.ReLU, net_arch=[32, 16])), batched=True
    ),
    "empty-infos": dict(env=lambda: InfosOnlyAtEpisodeEnds(_pendulum()), options=dict(n_steps=256), batched=True),
    "overridden-forward": dict(env=_pendulum, policy=ShiftedValues, options=dict(n_steps=64), batched=False),
    "forward-hook-on-policy": dict(
        env=_pendulum,
        options=dict(n_steps=64),
        prepare=lambda model: model.policy.register_forward_hook(lambda module, inputs, output: None),
        batched=False,
    ),
    "batchnorm-dropout": dict(
        env=_pendulum, options=dict(n_steps=64, policy_kwargs=dict(features_extractor_class=BatchNormDropout)), batched=False
    ),
    "user-callback-stops": dict(env=_pendulum, options=dict(n_steps=64), callback=lambda: StopAt(10), batched=True),
    # SB3's StopTrainingOnMaxEpisodes stops at the first episode end.
    "sb3-callback-stops": dict(
        env=lambda: make_vec_env("CartPole-v1", n_envs=2, seed=0),
        options=dict(n_steps=128),
        callback=lambda: StopTrainingOnMaxEpisodes(max_episodes=1),
        batched=True,
    ),
    # The stop of a tuning trial (sb3_trpo.zoo --n-jobs).
    "signal-stop-callback": dict(
        env=_pendulum, options=dict(n_steps=64), callback=lambda: SignalStopCallback(SignalStop()), batched=True
    ),
    "user-callback-edits-weights": dict(
        env=_pendulum, options=dict(n_steps=64, background_critic_fit=False), callback=lambda: EditWeightsAt(20), batched=True
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rollout_leaves_what_sb3_leaves(name: str) -> None:
    case = CASES[name]
    ours, sb3 = _run(TRPO.collect_rollouts, case), _run(OnPolicyAlgorithm.collect_rollouts, case)
    assert ours.batched is case["batched"]
    assert (ours.returned, ours.callback_calls) == (sb3.returned, sb3.callback_calls)
    _assert_same_rollout(ours.model, sb3.model)
    assert ours.model.policy.training is False


def test_cases_hold_what_they_are_named_for() -> None:
    """The truncation, empty-infos and stopping cases check those paths only if their rollouts hold them."""
    model, returned, _, _ = _run(TRPO.collect_rollouts, CASES["box-vecnormalize-truncations"])
    # 200-step episodes: both environments were truncated after step 199 and restarted.
    buffer = model.rollout_buffer
    assert returned and buffer.episode_starts[200].all() and buffer.episode_starts[1:200].sum() == 0
    model, returned, _, _ = _run(TRPO.collect_rollouts, CASES["sb3-callback-stops"])
    assert not returned and 0 < model.rollout_buffer.pos < model.n_steps
    assert np.all(model.rollout_buffer.values[: model.rollout_buffer.pos] != 0)
    model, returned, _, _ = _run(TRPO.collect_rollouts, CASES["user-callback-stops"])
    assert not returned and model.rollout_buffer.pos == 9
    model = _run(TRPO.collect_rollouts, CASES["overridden-forward"]).model
    with th.no_grad():
        values = model.policy.predict_values(obs_as_tensor(model.rollout_buffer.observations[:, 0], model.device))
    assert np.allclose(model.rollout_buffer.values[:, 0], values.numpy().flatten() + 1.0, atol=1e-6)


def test_callback_edits_take_effect_from_the_next_step() -> None:
    case = CASES["user-callback-edits-weights"]
    edited, unedited = (_run(TRPO.collect_rollouts, {**case, "callback": fn}).model for fn in (case["callback"], None))
    same = np.all(edited.rollout_buffer.actions == unedited.rollout_buffer.actions, axis=(1, 2))
    # The 20th call follows the 20th step (row 19); the actions of row 20 on are drawn with std exp(-1).
    assert same[:20].all() and not same[20:].any()


def test_batch_norm_statistics_are_left_to_train() -> None:
    case = CASES["batchnorm-dropout"]
    np.random.seed(0)
    model = TRPO("MlpPolicy", case["env"](), seed=0, **case["options"])
    initial = _batch_norm_statistics(model)
    assert th.equal(initial[0], th.zeros(16)) and th.equal(initial[1], th.ones(16)) and initial[2] == 0
    model.learn(64)
    # The rollout ran in eval mode, the update in train mode: the statistics moved only there.
    assert model.policy.training
    trained = _batch_norm_statistics(model)
    assert not th.equal(trained[0], initial[0]) and trained[2] > 0
    _, callback = model._setup_learn(64, None, reset_num_timesteps=False)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert not model.policy.training
    assert all(th.equal(x, y) for x, y in zip(_batch_norm_statistics(model), trained, strict=True))


@pytest.mark.parametrize(
    ("algorithm", "policy", "make_env"),
    [
        (TRPO, "MlpPolicy", _pendulum),
        (NPG, "MlpPolicy", _pendulum),
        (MaskableTRPO, "MlpPolicy", lambda: InvalidActionEnvDiscrete(dim=5, n_invalid_actions=2)),
        (RecurrentTRPO, "MlpLstmPolicy", _pendulum),
    ],
    ids=["trpo", "npg", "maskable-discrete", "recurrent"],
)
def test_batch_norm_and_dropout_policies_train_with_every_algorithm(algorithm, policy: str, make_env) -> None:
    options = dict(
        n_steps=32, batch_size=16, n_critic_updates=2, seed=0, policy_kwargs=dict(features_extractor_class=BatchNormDropout)
    )
    model = algorithm(policy, make_env(), **options)
    statistics = _batch_norm_statistics(model)
    assert statistics[2] == 0  # construction ran no training-mode forward pass
    _, callback = model._setup_learn(32, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert all(th.equal(x, y) for x, y in zip(_batch_norm_statistics(model), statistics, strict=True))
    model.learn(64, reset_num_timesteps=False)
    assert _batch_norm_statistics(model)[2] > 0
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())
    model.predict(model.observation_space.sample())
    assert not model.policy.training


def test_split_changes_no_mode_buffer_generator_or_observation_space() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=dict(features_extractor_class=BatchNormDropout))
    policy = model.policy
    policy.set_training_mode(True)
    policy.features_extractor.net[1].train(False)  # modes need not be uniform
    modes = [module.training for module in policy.modules()]
    statistics = _batch_norm_statistics(model)
    generator = th.get_rng_state()
    space = policy.observation_space
    space.seed(5)
    next_observation = space.sample()
    space.seed(5)
    actor, critic = split_actor_critic(policy)
    assert [module.training for module in policy.modules()] == modes
    assert all(th.equal(x, y) for x, y in zip(_batch_norm_statistics(model), statistics, strict=True))
    assert th.equal(th.get_rng_state(), generator)
    assert np.array_equal(space.sample(), next_observation)
    assert [id(p) for p in actor] == [id(p) for p in model.actor_parameters]
    assert [id(p) for p in critic] == [id(p) for p in model.critic_parameters]


# ------------------------------------------------------------------ which loop runs
def _pendulum_model(**options: Any) -> TRPO:
    return TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, seed=0, **options)


def _override(method: str) -> type[ActorCriticPolicy]:
    original = getattr(ActorCriticPolicy, method)
    return type(
        f"Overrides_{method}", (ActorCriticPolicy,), {method: lambda self, *args, **kwargs: original(self, *args, **kwargs)}
    )


SB3_LOOP = {
    **{
        f"overrides {method}": lambda method=method: TRPO(_override(method), "Pendulum-v1", n_steps=64, seed=0)
        # The list, written out: a shorter POLICY_METHODS must fail here.
        for method in (
            "forward",
            "extract_features",
            "predict_values",
            "get_distribution",
            "_get_action_dist_from_latent",
            "evaluate_actions",
        )
    },
    "hook on the policy": lambda: _hooked(lambda model: model.policy.register_forward_pre_hook(lambda *_: None)),
    "hook on a container": lambda: _hooked(lambda model: model.policy.mlp_extractor.register_forward_hook(lambda *_: None)),
    "hook on a layer": lambda: _hooked(lambda model: model.policy.action_net.register_forward_pre_hook(lambda *_: None)),
    "backward hook": lambda: _hooked(lambda model: model.policy.value_net.register_full_backward_hook(lambda *_: None)),
    "compiled module": lambda: _hooked(_compile),
    "unknown module": lambda: _pendulum_model(policy_kwargs=dict(features_extractor_class=BatchNormDropout)),
    "unknown activation": lambda: _pendulum_model(policy_kwargs=dict(activation_fn=nn.Hardswish)),
}


def _compile(model: TRPO) -> None:
    # Importing torch's compiler turns off the argument checks of every torch distribution, for good.
    validate = th.distributions.Distribution._validate_args
    model.policy.mlp_extractor.compile()
    th.distributions.Distribution.set_default_validate_args(validate)


def _hooked(add: Callable[[TRPO], Any]) -> TRPO:
    model = _pendulum_model()
    add(model)
    return model


@pytest.mark.parametrize("name", list(SB3_LOOP))
def test_policies_not_recognised_exactly_run_sb3_loop(name: str) -> None:
    model = SB3_LOOP[name]()
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is None
    assert batched_rollout_sampler(_pendulum_model().policy, model.rollout_buffer) is not None


def test_global_hook_runs_sb3_loop() -> None:
    model = _pendulum_model()
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert batched_rollout_sampler(model.policy, model.rollout_buffer) is None
    finally:
        handle.remove()
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is not None


@pytest.mark.parametrize("name", ["_compiled_call_impl", "_global_forward_hooks"])
def test_a_torch_without_a_private_attribute_read_runs_sb3_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch release renaming a private name the gate reads fails closed: SB3's loop runs, even for a compiled policy."""
    model = _pendulum_model()
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is not None
    monkeypatch.delattr(nn.Module if name == "_compiled_call_impl" else nn.modules.module, name)
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is None
    _, callback = model._setup_learn(64, None)
    steps: list[str] = []
    monkeypatch.setattr(OnPolicyAlgorithm, "collect_rollouts", lambda *args: steps.append("sb3") or True)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, 64)
    assert steps == ["sb3"]


def test_sb3_loop_with_other_local_variables_runs_sb3_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _pendulum_model()
    monkeypatch.setattr(rollout_gate, "sb3_rollout_locals", lambda: rollout_gate.SB3_ROLLOUT_LOCALS | {"new_local"})
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is None


class SubclassedBuffer(RolloutBuffer):
    pass


def test_only_sb3_buffers_run_the_batched_loop() -> None:
    model = _pendulum_model()
    other = SubclassedBuffer(64, model.observation_space, model.action_space, n_envs=1)  # type: ignore[arg-type]
    assert batched_rollout_sampler(model.policy, model.rollout_buffer) is not None
    assert batched_rollout_sampler(model.policy, other) is None


# ------------------------------------------------------------------ the per-step sampler
def _forward_actions(policy: ActorCriticPolicy, observations: np.ndarray, seed: int) -> np.ndarray:
    th.manual_seed(seed)
    with th.no_grad():
        actions, _, _ = policy(obs_as_tensor(observations, policy.device))
    return actions.cpu().numpy()


def _sampled(policy: ActorCriticPolicy, observations: np.ndarray, seed: int) -> np.ndarray:
    th.manual_seed(seed)
    return action_sampler(policy)(observations)


POLICIES = {
    "tanh": dict(),
    "relu-matrix-actions": dict(activation_fn=nn.ReLU, net_arch=[32, 16]),
    "unshared": dict(share_features_extractor=False),
}


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Torch on two threads, where MKL splits some products among threads."""
    threads = th.get_num_threads()
    th.set_num_threads(2)
    yield
    th.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", list(POLICIES))
# torch draws normals in blocks of 16; MKL on two threads splits 7 rows differently from one thread
@pytest.mark.parametrize("n_observations", [1, 2, 3, 7, 15, 16, 17, 64])
def test_gaussian_mlp_sampler_draws_the_bits_policy_forward_draws(name: str, n_observations: int) -> None:
    action_shape = (2, 3) if "matrix" in name else (6,)
    observation_space = spaces.Box(-np.inf, np.inf, (17,), dtype=np.float64)
    action_space = spaces.Box(-1.0, 1.0, action_shape, dtype=np.float32)
    th.manual_seed(0)
    policy = ActorCriticPolicy(observation_space, action_space, lambda _: 1e-3, **POLICIES[name])
    assert gaussian_mlp_sampler(policy) is not None
    generator = np.random.default_rng(n_observations)
    for trial in range(10):
        with th.no_grad():
            policy.log_std.normal_()  # type: ignore[operator]
        observations = generator.normal(size=(n_observations, 17)) * generator.uniform(0.01, 100.0)
        if trial % 2:  # the same shape in another memory layout, after the contiguous one
            observations = np.asfortranarray(observations)
        expected = _forward_actions(policy, observations, trial)
        actions = _sampled(policy, observations, trial)
        assert actions.shape == (n_observations, *action_shape)
        assert np.array_equal(actions, expected.reshape(actions.shape))


def test_one_thread_check_compares_the_layers_bits() -> None:
    layers = [nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 6)]
    latent = th.zeros(5, 17)
    assert one_thread_gives_the_same_bits(layers, latent, lambda threads: 0)
    calls: list[int] = []

    def rounding_setter(threads: int) -> int:
        # a "one thread" MKL that rounds differently: the next product is off by one ulp
        calls.append(threads)
        return 0

    original = th.nn.functional.linear
    try:
        th.nn.functional.linear = lambda x, w, b: (
            original(x, w, b) if len(calls) % 2 == 0 else original(x, w, b).nextafter(th.tensor(np.inf))
        )
        assert not one_thread_gives_the_same_bits(layers, latent, rounding_setter)
    finally:
        th.nn.functional.linear = original
    assert calls and calls[0] == 1


def test_one_thread_check_refuses_outputs_that_elementwise_kernels_split() -> None:
    width = ELEMENTWISE_GRAIN_SIZE // 64
    layers = [nn.Linear(3, 64), nn.Tanh()]
    assert one_thread_gives_the_same_bits(layers, th.zeros(width - 1, 3), lambda threads: 0)
    assert not one_thread_gives_the_same_bits(layers, th.zeros(width, 3), lambda threads: 0)


@pytest.mark.skipif(mkl_thread_setter() is None, reason="torch does not compute with MKL here")
@pytest.mark.usefixtures("two_threads")
def test_mkl_thread_setter_sets_and_restores_the_calling_threads_setting() -> None:
    set_threads = mkl_thread_setter()
    assert set_threads is not None
    previous = set_threads(1)  # torch's set_num_threads sets MKL's thread-local setting too
    assert previous in (0, 2)
    assert set_threads(previous) == 1
    assert th.get_num_threads() == 2


@pytest.mark.parametrize(
    ("env_id", "options"),
    [
        ("CartPole-v1", {}),
        ("Pendulum-v1", dict(use_sde=True)),
        ("Pendulum-v1", dict(use_sde=True, policy_kwargs=dict(squash_output=True))),
    ],
    ids=["categorical", "gsde", "gsde-squash-output"],
)
def test_distribution_sampler_draws_the_bits_policy_forward_draws(env_id: str, options: dict) -> None:
    model = TRPO("MlpPolicy", env_id, seed=0, **options)
    assert gaussian_mlp_sampler(model.policy) is None
    observations = np.stack([model.observation_space.sample() for _ in range(5)])
    assert np.array_equal(_sampled(model.policy, observations, 1), _forward_actions(model.policy, observations, 1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_gaussian_mlp_sampler_casts_observations_as_sb3(dtype: type) -> None:
    observation_space = spaces.Box(-1000, 1000, (5,), dtype=dtype)
    th.manual_seed(0)
    policy = ActorCriticPolicy(observation_space, spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), lambda _: 1e-3)
    # float64 values that float32 must round, the largest float32 and beyond, subnormals.
    with np.errstate(over="ignore", invalid="ignore"):
        observations = np.array(
            [[1 / 3, -2 / 3, 1e-40, 3.4028235e38, 1e39], [np.pi, -np.e, 1e-310, 123456789.123, -5e-324]]
        ).astype(dtype)
    assert np.array_equal(_sampled(policy, observations, 4), _forward_actions(policy, observations, 4), equal_nan=True)


def test_gaussian_mlp_sampler_reads_the_weights_at_every_step() -> None:
    model = _pendulum_model()
    policy = model.policy
    sample = action_sampler(policy)
    observations = np.stack([model.observation_space.sample() for _ in range(4)])
    edits = [
        lambda: policy.log_std.data.fill_(-2.0),  # type: ignore[operator]
        lambda: policy.action_net.weight.data.mul_(3.0),
        lambda: setattr(policy.mlp_extractor.policy_net[0].bias, "data", th.ones(64)),
        lambda: policy.load_state_dict({k: v + 0.5 for k, v in policy.state_dict().items()}),
    ]
    for edit in edits:
        before = _sampled(policy, observations, 2)
        with th.no_grad():
            edit()
        th.manual_seed(2)
        actions = sample(observations)
        assert not np.array_equal(actions, before)
        assert np.array_equal(actions, _forward_actions(policy, observations, 2))


@pytest.mark.parametrize(
    ("parameter", "value", "message"),
    [
        ("action_net.bias", float("nan"), "parameter loc"),
        ("log_std", float("nan"), "parameter scale"),
        ("log_std", -200.0, "parameter scale"),
    ],
    ids=["nan-mean", "nan-std", "zero-std"],
)
def test_invalid_distribution_raises_sb3_error(parameter: str, value: float, message: str) -> None:
    model = TRPO("MlpPolicy", "HalfCheetah-v5", n_steps=64, seed=0)
    with th.no_grad():
        model.policy.get_parameter(parameter)[-1] = value  # the last of several entries
    observations = np.zeros((2, 17))
    with pytest.raises(ValueError, match=f"Expected {message}") as sb3_error, th.no_grad():
        model.policy(obs_as_tensor(observations, model.device))
    with pytest.raises(ValueError, match=f"Expected {message}") as our_error:
        action_sampler(model.policy)(observations)
    assert str(our_error.value) == str(sb3_error.value)


def test_nan_standard_deviation_without_argument_checks_draws_as_sb3() -> None:
    model = _pendulum_model()
    with th.no_grad():
        model.policy.log_std.fill_(float("nan"))  # type: ignore[operator]
    observations = np.zeros((2, 3), dtype=np.float32)
    validate = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(False)
    try:
        actions = _sampled(model.policy, observations, 5)
        generator_after_ours = th.get_rng_state()
        expected = _forward_actions(model.policy, observations, 5)
    finally:
        th.distributions.Distribution.set_default_validate_args(validate)
    assert np.isnan(expected).all() and np.array_equal(actions, expected, equal_nan=True)
    assert th.equal(th.get_rng_state(), generator_after_ours)  # the same draws were consumed


def test_ctypes_is_imported_by_one_module_of_the_package_only() -> None:
    """Every call into a C library goes through common/native.py, the one place to review and to port."""
    package = Path(sb3_trpo.__file__).parent
    uses_ctypes = re.compile(r"^\s*(import|from) ctypes\b", re.M)
    sources = package.rglob("*.py")
    importers = sorted(str(path.relative_to(package)) for path in sources if uses_ctypes.search(path.read_text()))
    assert importers == ["common/native.py"]
