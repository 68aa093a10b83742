"""On a CUDA device: one update equals the CPU update from the same weights and rollout.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_device.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import sb3_contrib
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

from sb3_trpo import NPG, TRPO, MaskableTRPO, RecurrentTRPO
from tests.helpers import SMALL, actor_vector, all_finite, critic_vector
from tests.test_parity import actor_steps
from tests.test_recurrent import CueRecall

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")

CASES = [
    (TRPO, "MlpPolicy", lambda: gym.make("Pendulum-v1"), "analytic"),
    (TRPO, "MlpPolicy", lambda: gym.make("Pendulum-v1"), "double_backprop"),
    (TRPO, "MlpPolicy", lambda: gym.make("CartPole-v1"), "analytic"),
    (NPG, "MlpPolicy", lambda: gym.make("Pendulum-v1"), "analytic"),
    (MaskableTRPO, "MlpPolicy", lambda: InvalidActionEnvDiscrete(dim=5, n_invalid_actions=2), "analytic"),
    (RecurrentTRPO, "MlpLstmPolicy", lambda: gym.make("Pendulum-v1"), "analytic"),
    (RecurrentTRPO, "MlpLstmPolicy", lambda: gym.make("Pendulum-v1"), "double_backprop"),
    (RecurrentTRPO, "MlpLstmPolicy", lambda: CueRecall(), "double_backprop"),
]


@pytest.mark.parametrize(
    ("algorithm", "policy", "env_fn", "fisher"),
    CASES,
    ids=["trpo-gaussian", "trpo-gaussian-double-backprop", "trpo-categorical", "npg", "maskable", "recurrent",
         "recurrent-double-backprop", "recurrent-categorical"],
)  # fmt: skip
def test_update_on_cuda_equals_update_on_cpu(
    algorithm: type[NPG], policy: str, env_fn: Callable[[], gym.Env], fisher: str
) -> None:
    on_cpu = algorithm(policy, env_fn(), device="cpu", fisher_vector_product=fisher, **SMALL)
    on_cuda = algorithm(policy, env_fn(), device="cuda", fisher_vector_product=fisher, **SMALL)
    assert on_cuda.device.type == "cuda"
    on_cuda.policy.load_state_dict(on_cpu.policy.state_dict())
    # Collect one rollout on the CPU model without training on it, then give both the same batch.
    on_cpu.train = lambda: None  # type: ignore[method-assign]
    on_cpu.learn(SMALL["n_steps"])
    del on_cpu.train
    on_cuda.rollout_buffer = copy.deepcopy(on_cpu.rollout_buffer)
    on_cuda.rollout_buffer.device = on_cuda.device
    on_cuda.set_logger(configure(None, []))

    before_actor, before_critic = actor_vector(on_cpu), critic_vector(on_cpu)
    for model in (on_cpu, on_cuda):
        # The critic's minibatches and any sub-sampling draw from the global generators.
        np.random.seed(1)
        th.manual_seed(1)
        model.train()
        model.finish_critic_fit()  # the CPU model fits its critic in the background by default
    cpu_actor, cpu_critic = actor_vector(on_cpu), critic_vector(on_cpu)
    cuda_actor, cuda_critic = actor_vector(on_cuda), critic_vector(on_cuda)
    cpu_step = cpu_actor - before_actor
    assert float(cpu_step.norm()) > 1e-4, "the CPU update must move the actor"
    assert all_finite(on_cuda)
    assert all(p.device.type == "cuda" for p in on_cuda.policy.parameters())
    # float32 rounding differs between the CPU and CUDA kernels and grows through conjugate
    # gradient and the LSTM's sequences; the tolerance is the sb3-contrib parity test's.
    assert float((cuda_actor - cpu_actor).norm() / cpu_step.norm()) < 1e-2
    cpu_critic_step = cpu_critic - before_critic
    assert float((cuda_critic - cpu_critic).norm() / cpu_critic_step.norm()) < 1e-2


@pytest.mark.parametrize("fisher", ["analytic", "double_backprop"])
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_actor_step_on_cuda_matches_sb3_contrib_on_cuda(env_id: str, fisher: str) -> None:
    reference_step, our_step, ours = actor_steps(env_id, fisher, device="cuda")
    assert ours.device.type == "cuda"
    assert float(reference_step.norm()) > 1e-4, "the reference update must move the actor"
    assert float((our_step - reference_step).norm() / reference_step.norm()) < 1e-2


def test_weights_of_an_sb3_contrib_model_keep_training_on_cuda() -> None:
    # sb3-contrib's unfused Adam keeps its step counters on the CPU; the fused kernel needs them on the GPU.
    reference = sb3_contrib.TRPO("MlpPolicy", "Pendulum-v1", device="cuda", **SMALL).learn(SMALL["n_steps"])
    ours = TRPO("MlpPolicy", "Pendulum-v1", device="cuda", **SMALL)
    ours.set_parameters(reference.get_parameters())
    before = actor_vector(ours)
    ours.learn(SMALL["n_steps"])
    assert not th.equal(before, actor_vector(ours))
    assert all_finite(ours)


def test_model_trained_on_cuda_loads_on_cpu_with_the_same_actions(tmp_path: Path) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", device="cuda", **SMALL).learn(2 * SMALL["n_steps"])
    model.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", device="cpu")
    observations = np.stack([model.observation_space.sample() for _ in range(16)])
    on_cuda, _ = model.predict(observations, deterministic=True)
    on_cpu, _ = loaded.predict(observations, deterministic=True)
    assert np.allclose(on_cuda, on_cpu, atol=1e-5)
    loaded.set_env(make_vec_env("Pendulum-v1"))
    loaded.learn(SMALL["n_steps"], reset_num_timesteps=False)
    assert all_finite(loaded)


def test_background_critic_fit_is_refused_on_cuda_and_a_model_saved_with_it_loads_there(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^background_critic_fit=True cannot run: it runs on the CPU only"):
        TRPO("MlpPolicy", "Pendulum-v1", device="cuda", background_critic_fit=True)
    assert not TRPO("MlpPolicy", "Pendulum-v1", device="cuda", **SMALL).critic_fitter.background  # "auto"
    TRPO("MlpPolicy", "Pendulum-v1", device="cpu", background_critic_fit=True, **SMALL).save(tmp_path / "model")
    # load() builds the model with device="auto", the GPU here, as rl-zoo3's enjoy does.
    with pytest.warns(RuntimeWarning, match=r"^background_critic_fit=True cannot run here \(it runs on the CPU only"):
        loaded = TRPO.load(tmp_path / "model", env=make_vec_env("Pendulum-v1"))
    assert loaded.device.type == "cuda" and not loaded.critic_fitter.background
    loaded.learn(SMALL["n_steps"])
    assert all_finite(loaded)
