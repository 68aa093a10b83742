"""Zips saved by an earlier release load into the current package and keep training."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_vec_env

from sb3_trpo import NPG, TRPO, MaskableTRPO, RecurrentTRPO

FIXTURES = Path(__file__).parent / "fixtures"

# Saved by release 0.1.0 (commit 6ecbd99, the flat layout sb3_trpo/npg.py, maskable.py, recurrent.py):
# net_arch=[8], n_steps=32, batch_size=16, n_critic_updates=1, seed=0, learn(64).
SAVED = [
    ("trpo_0.1.0.zip", TRPO, lambda: make_vec_env("Pendulum-v1")),
    ("npg_0.1.0.zip", NPG, lambda: make_vec_env("CartPole-v1")),
    ("trpo_mask_0.1.0.zip", MaskableTRPO, lambda: InvalidActionEnvDiscrete(dim=5, n_invalid_actions=2)),
    ("trpo_lstm_0.1.0.zip", RecurrentTRPO, lambda: make_vec_env("CartPole-v1")),
]


@pytest.mark.parametrize(("name", "cls", "make_env"), SAVED, ids=[name for name, _, _ in SAVED])
def test_zip_saved_by_release_0_1_0_loads_and_trains(name, cls, make_env) -> None:
    path = FIXTURES / name
    with zipfile.ZipFile(path) as archive:
        saved = th.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)
    model = cls.load(path, env=make_env())
    assert type(model) is cls
    state = model.policy.state_dict()
    assert state.keys() == saved.keys()
    assert all(th.equal(state[key], saved[key]) for key in saved)
    # The parameter lists are the loaded policy's own tensors, every one in exactly one list.
    split = sorted(id(p) for p in [*model.actor_parameters, *model.critic_parameters])
    assert split == sorted(id(p) for p in model.policy.parameters())
    model.learn(64, reset_num_timesteps=False)
    assert model.num_timesteps == 128
    trained = model.policy.state_dict()
    assert any(not th.equal(trained[key], saved[key]) for key in saved)
