"""HalfCheetah-v5, rl-zoo3 settings, 300k steps: sb3_trpo with KL(old||new) (default) vs KL(new||old) in the line search."""
import sys, json
import numpy as np, torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.distributions import kl_divergence
from sb3_trpo import TRPO

class ReverseKL(TRPO):
    def _mean_kl(self, old, new, batch):
        return kl_divergence(new, old).mean()

variant, seed = sys.argv[1], int(sys.argv[2])
th.set_num_threads(1)
cls = {"forward": TRPO, "reverse": ReverseKL}[variant]
env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=2, seed=seed))
model = cls("MlpPolicy", env, n_steps=1024, batch_size=128, gamma=0.99, gae_lambda=0.95, cg_max_steps=25, cg_damping=0.1,
            n_critic_updates=20, learning_rate=1e-3, target_kl=0.04, seed=seed)
model.learn(300_000)
eval_env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=1, seed=seed + 1000), training=False, norm_reward=False)
eval_env.obs_rms = env.obs_rms
mean, std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
print(json.dumps({"variant": variant, "seed": seed, "return": mean, "std": float(th.exp(model.policy.log_std).mean())}), flush=True)
