"""One update of Humanoid-v5 candidate 3, from identical states late in training: sb3_trpo against sb3-contrib.

``python -m benchmarks.step_parity train DIR`` trains sb3_trpo with the candidate's settings (seed 0,
one torch thread) and saves the model and its VecNormalize statistics at 200k, 500k, 800k and
1.1M steps; ``python -m benchmarks.step_parity check DIR MARK`` loads the checkpoint taken at MARK steps,
collects one rollout with sb3-contrib, and runs one ``train()`` of each implementation on copies
of that rollout from the same weights, optimizer state and random generators, printing how far
each update lands from sb3-contrib's (relative error of the actor's and of the critic's change).
sb3-contrib once more with its conjugate gradient started from zero instead of its 1e-4-scaled
random start shows how much the update moves from that alone. Its figures:
``benchmark_results/returns_2m_humanoid_n2048_logstd/step_parity.txt``; ``tests/test_benchmark_returns.py``
runs it on a small task.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import sb3_contrib
import torch as th
from sb3_contrib.common import utils as contrib_utils
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo import TRPO
from sb3_trpo.common.policies import split_actor_critic

SETTINGS = dict(
    n_steps=2048,
    batch_size=128,
    cg_max_steps=25,
    n_critic_updates=20,
    learning_rate=1e-3,
    policy_kwargs=dict(log_std_init=-1.0),
)
MARKS = (200_000, 500_000, 800_000, 1_100_000)
ENV_ID = "Humanoid-v5"


class SaveAt(BaseCallback):
    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory, self.marks = directory, list(MARKS)

    def _on_rollout_start(self) -> None:
        while self.marks and self.model.num_timesteps >= self.marks[0]:
            mark = self.marks.pop(0)
            self.model.save(f"{self.directory}/model_{mark}")
            self.model.get_vec_normalize_env().save(f"{self.directory}/vecnorm_{mark}.pkl")

    def _on_step(self) -> bool:
        return True


def train(directory: str) -> None:
    env = VecNormalize(make_vec_env(ENV_ID, n_envs=2, seed=0))
    model = TRPO("MlpPolicy", env, seed=0, background_critic_fit=False, **SETTINGS)
    model.learn(MARKS[-1] + 4096, callback=SaveAt(directory))


class NoCallback:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: True


def check(directory: str, mark: str) -> dict[str, tuple[float, float]]:
    """Print, and return by label, the relative distance of each update's actor and critic change to sb3-contrib's."""
    saved = TRPO.load(f"{directory}/model_{mark}", device="cpu")

    def model(cls: type, **options: object):
        env = VecNormalize.load(f"{directory}/vecnorm_{mark}.pkl", make_vec_env(ENV_ID, n_envs=2, seed=5))
        env.training = False
        built = cls("MlpPolicy", env, seed=1, **options, **SETTINGS)
        built.policy.load_state_dict(saved.policy.state_dict())
        built.policy.optimizer.load_state_dict(copy.deepcopy(saved.policy.optimizer.state_dict()))
        built.set_logger(configure(None, []))
        return built

    collector = model(sb3_contrib.TRPO)
    collector._setup_learn(10**6)
    collector.collect_rollouts(collector.env, NoCallback(), collector.rollout_buffer, collector.n_steps)

    def update(cls: type, zero_cg_start: bool = False, **options: object) -> tuple[th.Tensor, dict]:
        built = model(cls, **options)
        built.rollout_buffer = copy.deepcopy(collector.rollout_buffer)
        random_start = contrib_utils.th.randn_like
        if zero_cg_start:
            contrib_utils.th.randn_like = th.zeros_like
        try:
            np.random.seed(0)
            th.manual_seed(0)
            before = th.cat([p.detach().flatten() for p in built.policy.parameters()])
            built.train()
            change = th.cat([p.detach().flatten() for p in built.policy.parameters()]) - before
        finally:
            contrib_utils.th.randn_like = random_start
        return change, dict(built.logger.name_to_value)

    reference, logged = update(sb3_contrib.TRPO)
    actor_parameters, _ = split_actor_critic(saved.policy)
    actor = th.cat([th.full((p.numel(),), any(p is a for a in actor_parameters)) for p in saved.policy.parameters()])

    def relative_error(change: th.Tensor, part: th.Tensor) -> float:
        return float((change[part] - reference[part]).norm() / reference[part].norm())

    print(
        f"{mark} steps: sb3-contrib's actor change {float(reference[actor].norm()):.4f}, "
        f"accepted KL {logged['train/kl_divergence_loss']:.6f}"
    )
    errors = {}
    for label, (change, _) in {
        "sb3-contrib, CG from zero": update(sb3_contrib.TRPO, zero_cg_start=True),
        "sb3_trpo, analytic": update(TRPO, fisher_vector_product="analytic", background_critic_fit=False),
        "sb3_trpo, double_backprop": update(TRPO, fisher_vector_product="double_backprop", background_critic_fit=False),
    }.items():
        errors[label] = (relative_error(change, actor), relative_error(change, ~actor))
        print(f"  {label:27s} actor {errors[label][0]:.1e}  critic {errors[label][1]:.1e}")
    return errors


if __name__ == "__main__":
    th.set_num_threads(1)
    if sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        check(sys.argv[2], sys.argv[3])
