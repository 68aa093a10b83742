"""The variants benchmark: comparable settings per task, the partially observed CartPole, what a measurement
reports, and the table's medians and ratios."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import sb3_contrib

import sb3_trpo
from sb3_trpo.benchmark import variants
from sb3_trpo.benchmark.variants import TASKS, MaskVelocity, Task


def test_mask_velocity_keeps_the_cart_and_pole_positions_only() -> None:
    env = MaskVelocity(gym.make("CartPole-v1"))
    full = gym.make("CartPole-v1")
    observation, _ = env.reset(seed=3)
    full_observation, _ = full.reset(seed=3)
    assert np.array_equal(observation, full_observation[[0, 2]])
    assert env.observation_space.shape == (2,)
    assert np.array_equal(env.observation_space.high, full.observation_space.high[[0, 2]])
    for _ in range(5):
        observation, *_ = env.step(1)
        full_observation, *_ = full.step(1)
        assert np.array_equal(observation, full_observation[[0, 2]])


@pytest.mark.parametrize("name", list(TASKS))
def test_both_variants_of_a_task_get_the_same_rollout_network_and_critic_passes(name: str) -> None:
    task = TASKS[name]
    ours_settings, theirs_settings = {**task.shared, **task.ours_only}, {**task.shared, **task.theirs_only}
    assert ours_settings["n_critic_updates"] == theirs_settings["n_epochs"]
    ours = getattr(sb3_trpo, task.ours)(task.policy, task.make_env(), **ours_settings)
    theirs = getattr(sb3_contrib, task.theirs)(task.policy, task.make_env(), **theirs_settings)
    assert (ours.n_steps, ours.batch_size) == (theirs.n_steps, theirs.batch_size)
    ours_shapes = [tuple(p.shape) for p in ours.policy.parameters()]
    assert ours_shapes == [tuple(p.shape) for p in theirs.policy.parameters()]


# sb3_trpo.TRPO against sb3_contrib.TRPO: a task of two tiny rollouts.
TINY = Task("TRPO", "TRPO", "MlpPolicy", lambda: gym.make("CartPole-v1"), 2, dict(n_steps=16, batch_size=32), {}, {})


def test_a_measurement_reports_the_speed_of_the_steps_it_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "tiny", TINY)
    trained = []
    original_train = sb3_trpo.TRPO.train
    monkeypatch.setattr(sb3_trpo.TRPO, "train", lambda self: trained.append(1) or original_train(self))
    result = variants.measure("tiny", "ours", steps=50, seed=0)
    # Two rollouts of 2 x 16 steps pass 50 steps: 64 steps trained, each rollout followed by an update.
    assert len(trained) == 2
    assert result["steps_per_s"] * result["total_s"] == pytest.approx(64)
    assert 0 < result["train_s"] < result["total_s"]


def test_the_worker_prints_its_measurement_as_the_last_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(TASKS, "tiny", TINY)
    assert variants.main(["--worker", "tiny", "theirs", "32", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"steps_per_s", "total_s", "train_s"}
    assert result["steps_per_s"] * result["total_s"] == pytest.approx(32)


def test_implementations_alternate_and_the_table_gives_medians_and_the_median_ratio(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    speeds = {"ours": iter([100.0, 200.0, 400.0]), "theirs": iter([100.0, 50.0, 100.0])}
    calls = []

    def worker(task: str, impl: str, steps: int, seed: int) -> dict[str, float]:
        calls.append(impl)
        return dict(steps_per_s=next(speeds[impl]), total_s=1.0, train_s=0.5)

    monkeypatch.setattr(variants, "_run_worker", worker)
    rows = variants.run(["Pendulum-lstm"], steps=8, repetitions=3, seed=0)
    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    # Per-repetition ratios 1, 4, 4: their median, not the ratio of the median speeds (200 / 100).
    assert rows == [("Pendulum-lstm", "RecurrentTRPO", 200.0, "RecurrentPPO", 100.0, 4.0)]
    assert "| Pendulum-lstm | RecurrentTRPO | 200 | RecurrentPPO | 100 | 4.00 |" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--steps", "--repetitions"])
def test_bad_options_are_refused_before_any_run(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        variants.main([option, "0"])
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err

