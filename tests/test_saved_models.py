"""Zips saved by an earlier release load into the current package and keep training."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
import sb3_contrib
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


def _pickled_data(path: Path) -> dict[str, bytes]:
    """The entries of a zip's ``data`` that SB3 pickled (those JSON cannot hold)."""
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    return {
        key: base64.b64decode(value[":serialized:"])
        for key, value in data.items()
        if isinstance(value, dict) and ":serialized:" in value
    }


def _zip_entry_sizes(path: Path) -> dict[str, int]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: info.file_size for info in archive.infolist()}


def test_saved_zip_is_as_small_as_sb3_contrib_and_loads_both_ways(tmp_path: Path) -> None:
    options = dict(n_steps=64, batch_size=32, seed=0, policy_kwargs=dict(net_arch=[256, 256]))
    ours = TRPO("MlpPolicy", "Pendulum-v1", **options).learn(64)
    theirs = sb3_contrib.TRPO("MlpPolicy", "Pendulum-v1", **options).learn(64)
    ours.save(tmp_path / "ours")
    theirs.save(tmp_path / "theirs")
    data = {name: _pickled_data(tmp_path / f"{name}.zip") for name in ("ours", "theirs")}
    # Nothing in the data is a torch object (a zip saved on CUDA warned on a CPU-only machine that
    # it could not deserialize the pickled parameter lists); the same entries are pickled as sb3-contrib's.
    assert data["ours"].keys() == data["theirs"].keys()
    assert not any(b"torch" in pickled for pickled in data["ours"].values())
    # The weights (policy.pth, optimizer) are the same size; the data differs by a few hyperparameters.
    sizes = {name: (tmp_path / f"{name}.zip").stat().st_size for name in ("ours", "theirs")}
    assert abs(sizes["ours"] - sizes["theirs"]) <= 0.05 * sizes["theirs"], sizes
    assert _zip_entry_sizes(tmp_path / "ours.zip")["policy.pth"] == _zip_entry_sizes(tmp_path / "theirs.zip")["policy.pth"]

    loaded_by_contrib = sb3_contrib.TRPO.load(tmp_path / "ours", env=make_vec_env("Pendulum-v1"))
    loaded_by_us = TRPO.load(tmp_path / "theirs", env=make_vec_env("Pendulum-v1"))
    for loaded, saved in ((loaded_by_contrib, ours), (loaded_by_us, theirs)):
        assert all(th.equal(a, b) for a, b in zip(loaded.policy.parameters(), saved.policy.parameters(), strict=True))
        loaded.learn(64, reset_num_timesteps=False)
    # The parameter lists are rebuilt from the loaded policy.
    assert sorted(id(p) for p in [*loaded_by_us.actor_parameters, *loaded_by_us.critic_parameters]) == sorted(
        id(p) for p in loaded_by_us.policy.parameters()
    )
