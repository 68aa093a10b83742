"""HalfCheetah-v5, rl-zoo3 settings, 300k steps: the line search's KL direction compared.

RECORD of a one-off experiment, kept with its results; not maintained and not run by the
tests. It overrides ``_mean_kl``, which the line search of sb3_trpo up to 0.1.0 (6ecbd99)
called; since the package layout of issue 13 the line search measures the KL in
``TrustRegionAlgorithm._step_evaluation``, so against the current package the "forward"
variant would silently run the reverse direction. Check out 6ecbd99 to rerun it.

    python kl_direction.py {forward,reverse} SEED

forward: the paper's KL(pi_old || pi_new); reverse: KL(pi_new || pi_old), as sb3-contrib
measures it and as sb3_trpo now does by default. The results in
kl_direction_results.jsonl were produced with sb3_trpo at 7d28590 (line search on
KL(pi_old || pi_new) by default, ``NPG._mean_kl(old, new)``) and a script that overrode the
hook for the reverse direction; this copy does the same on the current ``_mean_kl(p, q)``.
"""

import json
import sys

import torch as th
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo import TRPO


class PaperKL(TRPO):
    def _mean_kl(self, p, q, batch):
        # sb3_trpo calls _mean_kl(new, old); the paper's direction swaps them back.
        return kl_divergence(q, p).mean()


variant, seed = sys.argv[1], int(sys.argv[2])
th.set_num_threads(1)
algorithm = {"forward": PaperKL, "reverse": TRPO}[variant]
env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=2, seed=seed))
model = algorithm(
    "MlpPolicy",
    env,
    n_steps=1024,
    batch_size=128,
    gamma=0.99,
    gae_lambda=0.95,
    cg_max_steps=25,
    cg_damping=0.1,
    n_critic_updates=20,
    learning_rate=1e-3,
    target_kl=0.04,
    seed=seed,
)
model.learn(300_000)
eval_env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=1, seed=seed + 1000), training=False, norm_reward=False)
eval_env.obs_rms = env.obs_rms
mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
std = float(th.exp(model.policy.log_std).mean())
print(json.dumps({"variant": variant, "seed": seed, "return": mean_return, "std": std}), flush=True)
