"""Errors that say what to do: unknown policy names, zips of other algorithms, damaged zips (common/loading.py)."""

from __future__ import annotations

import io
import pickle
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import sb3_contrib
import stable_baselines3 as sb3
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trpo import ACKTR, NPG, TRPO, MaskableTRPO, RecurrentTRPO

NON_RECURRENT = [TRPO, NPG, MaskableTRPO]


@pytest.mark.parametrize("cls", NON_RECURRENT, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("name", ["MlpLstmPolicy", "CnnLstmPolicy", "MultiInputLstmPolicy"])
def test_lstm_policy_name_points_to_recurrent_trpo(cls, name) -> None:
    with pytest.raises(ValueError, match=f"Policy {name} unknown") as raised:
        cls(name, "CartPole-v1")
    assert f"use RecurrentTRPO('{name}', env)" in str(raised.value)
    assert "Valid policy names: MlpPolicy, CnnPolicy, MultiInputPolicy." in str(raised.value)


@pytest.mark.parametrize(
    ("cls", "valid"),
    [(TRPO, "MlpPolicy, CnnPolicy, MultiInputPolicy"), (RecurrentTRPO, "MlpLstmPolicy, CnnLstmPolicy, MultiInputLstmPolicy")],
)
def test_unknown_policy_name_lists_the_valid_ones(cls, valid) -> None:
    with pytest.raises(ValueError, match=f"Valid policy names: {valid}.") as raised:
        cls("MlpPolicyy", "CartPole-v1")
    assert "RecurrentTRPO(" not in str(raised.value)


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


OTHER_ALGORITHMS: list[tuple[str, Callable, str]] = [
    ("PPO", lambda: sb3.PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), "stable_baselines3's PPO"),
    ("A2C", lambda: sb3.A2C("MlpPolicy", "CartPole-v1"), "stable_baselines3's A2C"),
    ("DQN", lambda: sb3.DQN("MlpPolicy", "CartPole-v1"), "stable_baselines3's DQN"),
    (
        "MaskablePPO",
        lambda: sb3_contrib.MaskablePPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64),
        "sb3_contrib's MaskablePPO",
    ),
]


@pytest.mark.parametrize(("name", "make", "saved_by"), OTHER_ALGORITHMS, ids=[name for name, _, _ in OTHER_ALGORITHMS])
def test_zip_of_another_algorithm_is_refused_naming_it(name, make, saved_by, tmp_path: Path) -> None:
    path = _save(make(), tmp_path / "other.zip")
    loader = MaskableTRPO if name == "MaskablePPO" else TRPO
    refused = "was not saved by TRPO, NPG, MaskableTRPO, RecurrentTRPO or sb3-contrib's TRPO"
    with pytest.raises(ValueError, match=refused) as raised:
        loader.load(path)
    message = str(raised.value)
    # Exactly the saving algorithm: A2C's zip is not blamed on PPO, nor PPO's on A2C.
    assert f"it was saved by {saved_by}: load it with {name}.load(...)" in message


class CustomPolicy(ActorCriticPolicy):
    """A policy class of no library algorithm's aliases."""


def test_zip_of_an_unknown_algorithm_is_refused_naming_its_policy_class(tmp_path: Path) -> None:
    path = _save(sb3.A2C(CustomPolicy, "CartPole-v1", n_steps=8), tmp_path / "custom.zip")
    with pytest.raises(ValueError, match=f"its policy class: {__name__}.CustomPolicy"):
        TRPO.load(path)


def test_zips_of_the_other_family_of_the_package_are_refused_naming_it(tmp_path: Path) -> None:
    acktr = _save(ACKTR("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "acktr.zip")
    with pytest.raises(ValueError, match="it was saved by ACKTR: load it with ACKTR"):
        TRPO.load(acktr)
    trpo = _save(TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "trpo.zip")
    with pytest.raises(ValueError, match=r"was not saved by ACKTR .*it was saved by TRPO, NPG, MaskableTRPO, RecurrentTRPO"):
        ACKTR.load(trpo)
    assert isinstance(ACKTR.load(acktr), ACKTR)


def test_zips_of_trust_region_algorithms_still_load(tmp_path: Path) -> None:
    theirs = _save(sb3_contrib.TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "theirs.zip")
    ours = _save(NPG("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "ours.zip")
    assert type(TRPO.load(theirs)) is TRPO
    assert type(NPG.load(ours)) is NPG


def test_load_from_a_file_object_reads_it_once_checked(tmp_path: Path) -> None:
    """The check reads the zip before SB3 does; a file object is handed back where it was."""
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, seed=0)
    path = _save(model, tmp_path / "model.zip")
    loaded = TRPO.load(io.BytesIO(path.read_bytes()))
    assert all(th.equal(a, b) for a, b in zip(loaded.policy.parameters(), model.policy.parameters(), strict=True))
    assert type(TRPO.load(tmp_path / "model")) is TRPO  # ".zip" appended, as SB3 does


def _rewritten(source: Path, target: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A zip whose members pass their checksums but hold ``change(name, content)``."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            out.writestr(name, change(name, archive.read(name)))
    return target


def _code_in_pth(name: str, content: bytes) -> bytes:
    """policy.pth whose pickle calls a function: torch's weights-only unpickler refuses it."""
    if name != "policy.pth":
        return content
    inner, out = zipfile.ZipFile(io.BytesIO(content)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as rewritten:
        for member in inner.namelist():
            rewritten.writestr(member, pickle.dumps(print) if member.endswith("data.pkl") else inner.read(member))
    return out.getvalue()


def _truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:-30])
    return target


def _byte_flipped(source: Path, target: Path) -> Path:
    content = bytearray(source.read_bytes())
    content[200] ^= 0xFF
    target.write_bytes(bytes(content))
    return target


DAMAGE: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated": (_truncated, "it lacks data and policy.pth"),
    "flipped byte": (_byte_flipped, "not a complete zip file"),
    "policy.pth cut": (
        lambda source, target: _rewritten(source, target, lambda n, b: b[: len(b) // 2] if n == "policy.pth" else b),
        "not a complete torch archive",
    ),
    "policy.pth code": (lambda source, target: _rewritten(source, target, _code_in_pth), "cannot be read"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_zip_says_so_in_plain_words(damage: str, tmp_path: Path) -> None:
    source = _save(TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "model.zip")
    make, what = DAMAGE[damage]
    path = make(source, tmp_path / "damaged.zip")
    with pytest.raises(ValueError, match=f"The model file .*damaged.zip is damaged: .*{what}") as raised:
        TRPO.load(path)
    # Neither the message nor the traceback a user sees (chained exceptions included) carries torch's advice.
    assert "weights_only" not in "".join(traceback.format_exception(raised.value))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_damage_cases_damage_the_zip(tmp_path: Path) -> None:
    """Each damaged file fails in sb3-contrib's load too: the cases test damage, not the check."""
    source = _save(TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64), tmp_path / "model.zip")
    for damage, (make, _) in DAMAGE.items():
        path = make(source, tmp_path / f"{damage}.zip")
        with pytest.raises(Exception):  # noqa: B017 - SB3 raises assertions, torch errors, zip errors
            sb3_contrib.TRPO.load(path, env=make_vec_env("CartPole-v1"))
