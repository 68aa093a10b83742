"""A trust region that changes over training: ``target_kl`` as a schedule of the remaining progress."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch as th
from stable_baselines3.common.distributions import kl_divergence

import sb3_trpo.common.trust_region_algorithm as trust_region_algorithm
from sb3_trpo import NPG, TRPO
from sb3_trpo.hyperparams import TargetKLSchedule, convert_params, entry_params, sample_trpo_params, target_kl_schedule
from sb3_trpo.zoo import CheckedExperimentManager, main
from tests.helpers import learn_recording, recording_logger


def test_npg_scales_each_step_to_the_schedule_at_that_update() -> None:
    """NPG's measured KL follows the quadratic model's radius (CartPole, radii of 1e-4 as in the constant test)."""
    schedule = TargetKLSchedule(start=2e-4, end=2e-5, end_fraction=1.0)
    options = dict(n_steps=256, cg_max_steps=50, cg_damping=1e-4, cg_residual_tol=0.0, seed=0)
    model = NPG("MlpPolicy", "CartPole-v1", target_kl=schedule, **options)
    _, updates = learn_recording(model, 4 * 256)
    assert len(updates) == 4
    for k, record in enumerate(updates, start=1):
        # SB3's progress remaining when update k trains: 1 - timesteps so far / total.
        expected = schedule(1 - k * 256 / (4 * 256))
        assert record["train/target_kl"] == pytest.approx(expected, rel=1e-12)
        assert record["train/accepted_kl"] == pytest.approx(expected, rel=0.25)
    assert updates[-1]["train/accepted_kl"] < 0.5 * updates[0]["train/accepted_kl"]


def test_trpo_line_search_bounds_each_update_by_its_current_radius(monkeypatch: pytest.MonkeyPatch) -> None:
    # Radii from 0.05 down to 1e-4. Every full step is made 3 times too long (about 9 times the radius in KL),
    # so the line search, not the step's scaling, decides; bounded by the start value, late steps would pass.
    real_max_step_size = trust_region_algorithm.max_step_size
    monkeypatch.setattr(trust_region_algorithm, "max_step_size", lambda *args: 3 * real_max_step_size(*args))
    schedule = TargetKLSchedule(start=0.05, end=1e-4, end_fraction=1.0)
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, n_critic_updates=2, target_kl=schedule, seed=0)
    _, updates = learn_recording(model, 6 * 64)
    for k, record in enumerate(updates, start=1):
        current = schedule(1 - k / 6)
        assert record["train/target_kl"] == pytest.approx(current, rel=1e-12)
        assert record["train/is_line_search_success"] == 1.0
        assert 0 < record["train/accepted_kl"] < current
        assert record["train/line_search_backtracks"] > 0


def test_max_kl_is_the_largest_per_state_kl_of_the_accepted_step() -> None:
    """Checked against SB3's KL of the policies before and after one update, per state (Swimmer: 2 action dimensions)."""
    model = TRPO("MlpPolicy", "Swimmer-v5", n_steps=128, batch_size=64, n_critic_updates=1, seed=0, target_kl=0.02)
    logger = recording_logger(model)
    model.learn(128)
    before = copy.deepcopy(model.policy)
    model.train()
    records = logger.latest
    assert records["train/is_line_search_success"] == 1.0
    observations = th.as_tensor(model.rollout_buffer.observations.reshape(128, -1))
    with th.no_grad():
        per_term = kl_divergence(model.policy.get_distribution(observations), before.get_distribution(observations))
    assert per_term.shape == (128, 2)
    per_state = per_term.mean(dim=1)
    assert records["train/max_kl"] == pytest.approx(float(per_state.max()), rel=1e-5)
    assert records["train/accepted_kl"] == pytest.approx(float(per_state.mean()), rel=1e-5)
    assert records["train/max_kl"] > records["train/accepted_kl"]


@pytest.mark.parametrize(
    "target_kl",
    [lambda progress: 0.01 * progress, lambda progress: progress - 0.5, lambda progress: float("nan")],
    ids=["zero at the end", "negative at the start", "not a number"],
)
def test_schedule_not_positive_at_progress_1_and_0_is_refused(target_kl) -> None:
    with pytest.raises(ValueError, match=r"^target_kl must be > 0 \(or a schedule that is > 0 at progress 1 and 0\)"):
        TRPO("MlpPolicy", "Pendulum-v1", target_kl=target_kl)


def test_schedule_is_saved_and_loaded_like_the_learning_rate(tmp_path: Path) -> None:
    schedule = target_kl_schedule("lin_0.03")
    TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, target_kl=schedule).save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model")
    assert loaded.target_kl == schedule
    assert loaded.current_target_kl() == pytest.approx(0.03)


def test_lin_spelling_shrinks_to_a_tenth_and_bad_strings_name_target_kl() -> None:
    schedule = target_kl_schedule("lin_0.02")
    assert (schedule(1.0), schedule(0.5), schedule(0.0)) == pytest.approx((0.02, 0.011, 0.002))
    for spec in ("lin_0", "exp_0.02", "lin_x", "0.02"):
        with pytest.raises(ValueError, match=r"^target_kl must be a number or 'lin_<start>'"):
            target_kl_schedule(spec)
    # rl-zoo3 turns its own keys' lin_ strings into schedules; the package adds target_kl's.
    processed = CheckedExperimentManager._preprocess_schedules({"target_kl": "lin_0.02", "learning_rate": "lin_0.001"})
    assert processed["target_kl"] == schedule
    assert processed["learning_rate"](0.5) == pytest.approx(0.0005)


def test_zoo_trains_with_a_lin_target_kl_from_the_command_line(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    options = "--algo trpo --env Pendulum-v1 -n 128 --seed 0 -params n_steps:64 n_envs:1 target_kl:'lin_0.05'"
    main(["train", *options.split(), "-f", str(logs)])
    model = TRPO.load(logs / "trpo" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    assert model.target_kl == target_kl_schedule("lin_0.05")


def test_sampled_schedule_round_trips_through_the_config_entry() -> None:
    entry = {"target_kl": target_kl_schedule("lin_0.02"), "n_steps": 1024}
    params = entry_params(sample_trpo_params, entry, TRPO, n_actions=1)
    assert (params["target_kl"], params["target_kl_schedule"]) == (0.02, "linear")
    assert convert_params(params)["target_kl"] == target_kl_schedule("lin_0.02")
    constant = entry_params(sample_trpo_params, {"target_kl": 0.02}, TRPO, n_actions=1)
    assert (constant["target_kl"], constant["target_kl_schedule"]) == (0.02, "constant")
    assert convert_params(constant)["target_kl"] == 0.02
    with pytest.raises(ValueError, match="target_kl of the config entry is a schedule"):
        entry_params(sample_trpo_params, {"target_kl": TargetKLSchedule(start=0.02, end=0.01, end_fraction=1.0)}, TRPO, 1)
