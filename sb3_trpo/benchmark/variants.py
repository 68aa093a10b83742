"""End-to-end throughput of RecurrentTRPO against RecurrentPPO and of MaskableTRPO against MaskablePPO.

``python -m sb3_trpo.benchmark.variants [--tasks ...] [--steps N] [--repetitions R]``

Each measurement trains one implementation in a fresh Python process; the two
implementations of a task alternate, repetition after repetition, so that both see the
same machine conditions. Both get the same rollout (``n_envs``, ``n_steps``), the same
network, and the same number of passes over the rollout for the value function (the
PPO variants' ``n_epochs`` of ``batch_size`` minibatches, the TRPO variants'
``n_critic_updates`` of ``batch_size`` minibatches); see ``TASKS``.

Output: one ``run`` line per measurement, then the table (median steps/s per
implementation and the median of the per-repetition ratios TRPO / PPO).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np


class MaskVelocity(gym.ObservationWrapper):
    """CartPole-v1 with the cart and pole velocities hidden (positions only): a partially observed task."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, gym.spaces.Box)
        self.observation_space = gym.spaces.Box(space.low[[0, 2]], space.high[[0, 2]], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[[0, 2]]


def _cartpole_no_velocity() -> gym.Env:
    return MaskVelocity(gym.make("CartPole-v1"))


def _pendulum() -> gym.Env:
    return gym.make("Pendulum-v1")


def _invalid_action_discrete() -> gym.Env:
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    return InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)


def _invalid_action_multi_discrete() -> gym.Env:
    from sb3_contrib.common.envs import InvalidActionEnvMultiDiscrete

    return InvalidActionEnvMultiDiscrete(dims=[10, 10], n_invalid_actions=8)


@dataclass(frozen=True)
class Task:
    """A task and the comparable settings of its TRPO variant (``ours``) and PPO variant (``theirs``)."""

    ours: str
    theirs: str
    policy: str
    make_env: Any
    n_envs: int
    shared: dict[str, Any]
    ours_only: dict[str, Any] = field(default_factory=dict)
    theirs_only: dict[str, Any] = field(default_factory=dict)


_LSTM = dict(n_steps=128, batch_size=128, policy_kwargs=dict(lstm_hidden_size=64, net_arch=[64]))
_MASK = dict(n_steps=256, batch_size=64, policy_kwargs=dict(net_arch=[64, 64]))
TASKS: dict[str, Task] = {
    "CartPoleNoVel-lstm": Task(
        "RecurrentTRPO",
        "RecurrentPPO",
        "MlpLstmPolicy",
        _cartpole_no_velocity,
        4,
        _LSTM,
        {"n_critic_updates": 10},
        {"n_epochs": 10},
    ),
    "Pendulum-lstm": Task(
        "RecurrentTRPO", "RecurrentPPO", "MlpLstmPolicy", _pendulum, 4, _LSTM, {"n_critic_updates": 10}, {"n_epochs": 10}
    ),
    "InvalidActionDiscrete-mask": Task(
        "MaskableTRPO",
        "MaskablePPO",
        "MlpPolicy",
        _invalid_action_discrete,
        1,
        _MASK,
        {"n_critic_updates": 10},
        {"n_epochs": 10},
    ),
    "InvalidActionMultiDiscrete-mask": Task(
        "MaskableTRPO",
        "MaskablePPO",
        "MlpPolicy",
        _invalid_action_multi_discrete,
        1,
        _MASK,
        {"n_critic_updates": 10},
        {"n_epochs": 10},
    ),
}


def measure(task_name: str, impl: str, steps: int, seed: int) -> dict[str, float]:
    """Train ``impl`` (``"ours"`` or ``"theirs"``) on the task for ``steps`` steps in this process."""
    import sb3_contrib
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_trpo

    task = TASKS[task_name]
    if impl == "ours":
        algorithm, settings = getattr(sb3_trpo, task.ours), {**task.shared, **task.ours_only}
    else:
        algorithm, settings = getattr(sb3_contrib, task.theirs), {**task.shared, **task.theirs_only}
    env = make_vec_env(task.make_env, n_envs=task.n_envs, seed=seed)
    model = algorithm(task.policy, env, seed=seed, **settings)
    train = model.train
    train_s = 0.0

    def timed_train() -> None:
        nonlocal train_s
        start = time.perf_counter()
        train()
        train_s += time.perf_counter() - start

    model.train = timed_train
    start = time.perf_counter()
    model.learn(steps)
    total = time.perf_counter() - start
    return dict(steps_per_s=model.num_timesteps / total, total_s=total, train_s=train_s)


def _run_worker(task: str, impl: str, steps: int, seed: int) -> dict[str, float]:
    command = [sys.executable, "-m", "sb3_trpo.benchmark.variants", "--worker", task, impl, str(steps), str(seed)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(tasks: list[str], steps: int, repetitions: int, seed: int) -> list[tuple[str, str, float, str, float, float]]:
    """Alternate the TRPO and PPO variant of each task in fresh processes; print and return the table rows."""
    rows = []
    for task_name in tasks:
        task = TASKS[task_name]
        results: dict[str, list[dict[str, float]]] = {"ours": [], "theirs": []}
        for repetition in range(repetitions):
            for impl in ("ours", "theirs") if repetition % 2 == 0 else ("theirs", "ours"):
                result = _run_worker(task_name, impl, steps, seed)
                results[impl].append(result)
                name = task.ours if impl == "ours" else task.theirs
                print(
                    f"run {task_name} {name} rep={repetition} steps_per_s={result['steps_per_s']:.0f} "
                    f"train_s={result['train_s']:.2f} total_s={result['total_s']:.2f}",
                    flush=True,
                )
        ratios = [o["steps_per_s"] / t["steps_per_s"] for o, t in zip(results["ours"], results["theirs"], strict=True)]
        ours = statistics.median(r["steps_per_s"] for r in results["ours"])
        theirs = statistics.median(r["steps_per_s"] for r in results["theirs"])
        rows.append((task_name, task.ours, ours, task.theirs, theirs, statistics.median(ratios)))
    print()
    print("| task | TRPO variant | steps/s | PPO variant | steps/s | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for task_name, ours_name, ours, theirs_name, theirs, ratio in rows:
        print(f"| {task_name} | {ours_name} | {ours:.0f} | {theirs_name} | {theirs:.0f} | {ratio:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sb3_trpo.benchmark.variants", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=8192, help="environment steps per measurement")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=4, metavar=("TASK", "IMPL", "STEPS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task, impl, steps, seed = args.worker
        print(json.dumps(measure(task, impl, int(steps), int(seed))))
        return 0
    for name, value in [("--steps", args.steps), ("--repetitions", args.repetitions)]:
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} steps={args.steps} repetitions={args.repetitions}")
    for name, task in TASKS.items():
        if name in args.tasks:
            print(
                f"# {name}: n_envs={task.n_envs} {task.shared} {task.ours}: {task.ours_only} {task.theirs}: {task.theirs_only}"
            )
    run(args.tasks, args.steps, args.repetitions, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
