"""It learns: rl-zoo3's tuned TRPO settings and budgets on CartPole-v1 and Pendulum-v1.

Run ``python -m tests.test_learning`` to measure both implementations on the same seeds
(10 deterministic evaluation episodes after training, seeds 0-2). The bars below are the
tasks' own, not measured figures, so they do not go stale.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo import TRPO

# rl-zoo3 2.9.2 hyperparams/trpo.yml, the whole budget.
ZOO_SETTINGS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_envs=2,
        n_timesteps=100_000,
        n_steps=512,
        batch_size=512,
        cg_damping=1e-3,
        gae_lambda=0.98,
        gamma=0.99,
        learning_rate=1e-3,
        n_critic_updates=20,
    ),
    "Pendulum-v1": dict(
        n_envs=2, n_timesteps=100_000, n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True, sde_sample_freq=4
    ),
}


def train_and_evaluate(algorithm: Any, env_id: str, seed: int) -> float:
    settings = dict(ZOO_SETTINGS[env_id])
    n_envs = settings.pop("n_envs")
    n_timesteps = settings.pop("n_timesteps")
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    model = algorithm("MlpPolicy", env, seed=seed, **settings)
    model.learn(n_timesteps)
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 1000)
    mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    return float(mean_return)


@pytest.mark.slow
def test_cartpole_reaches_sb3_contrib_return() -> None:
    """rl-zoo3 settings, 100k steps, 10 deterministic episodes: ours must reach CartPole's solved bar of 475 on seed 0."""
    assert train_and_evaluate(TRPO, "CartPole-v1", seed=0) >= 475.0


@pytest.mark.slow
def test_pendulum_reaches_sb3_contrib_return() -> None:
    """rl-zoo3 settings, 100k steps, 10 deterministic episodes: ours must beat -200 on seed 0 (untrained: far below)."""
    assert train_and_evaluate(TRPO, "Pendulum-v1", seed=0) >= -200.0


if __name__ == "__main__":
    import sb3_contrib

    seeds = [int(s) for s in sys.argv[1:]] or [0, 1, 2]
    for env_id in ZOO_SETTINGS:
        for name, algorithm in [("sb3_trpo", TRPO), ("sb3_contrib", sb3_contrib.TRPO)]:
            returns = [train_and_evaluate(algorithm, env_id, seed) for seed in seeds]
            print(
                f"{env_id} {name} seeds={seeds} returns={np.round(returns, 1).tolist()} mean={np.mean(returns):.1f}",
                flush=True,
            )
