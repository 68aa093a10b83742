"""TRPO on Hopper-v5 with VecNormalize, periodic evaluation, checkpoints, tensorboard and a progress bar.

pip install "sb3_trpo[mujoco]"
python examples/mujoco_hopper.py --timesteps 1000000 --logdir runs/hopper
tensorboard --logdir runs/hopper
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo import TRPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", type=Path, default=Path("runs/hopper"))
    args = parser.parse_args()

    env = VecNormalize(make_vec_env("Hopper-v5", n_envs=2, seed=args.seed))
    # The evaluation env uses the training env's normalization statistics (EvalCallback syncs them) without updating them.
    eval_env = VecNormalize(make_vec_env("Hopper-v5", n_envs=1, seed=args.seed + 100), training=False, norm_reward=False)
    # The package's zoo_configs/trpo.yml Hopper-v5 entry: rl-zoo3's MuJoCo TRPO settings with a longer horizon.
    model = TRPO(
        "MlpPolicy",
        env,
        n_steps=2048,
        batch_size=128,
        gamma=0.995,
        gae_lambda=0.95,
        cg_max_steps=25,
        cg_damping=0.1,
        n_critic_updates=20,
        learning_rate=1e-3,
        target_kl=0.01,
        tensorboard_log=str(args.logdir / "tb"),
        seed=args.seed,
    )
    callbacks = [
        EvalCallback(eval_env, eval_freq=10_000, n_eval_episodes=10, best_model_save_path=str(args.logdir / "best")),
        CheckpointCallback(save_freq=100_000, save_path=str(args.logdir / "checkpoints"), save_vecnormalize=True),
    ]
    model.learn(args.timesteps, callback=callbacks, progress_bar=True)
    model.save(args.logdir / "final_model")
    env.save(str(args.logdir / "vecnormalize.pkl"))
    print(f"saved to {args.logdir}")


if __name__ == "__main__":
    main()
