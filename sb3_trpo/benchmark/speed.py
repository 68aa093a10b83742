"""End-to-end throughput of sb3_trpo's TRPO against another implementation, side by side.

``python -m sb3_trpo.benchmark speed [--scenarios default callback scale] [--envs ...] [--steps N]
[--repetitions R] [--compare sb3_contrib] [--background-critic auto|true|false]``

Each measurement trains one implementation in a fresh Python process (so imports,
caches and allocator state do not leak between them); the implementations alternate,
repetition after repetition, so that both see the same machine conditions. Settings are
rl-zoo3's MuJoCo TRPO configuration (see ``SETTINGS``); a scenario (``SCENARIOS``) says where
a user trains with them:

- ``default``: HalfCheetah-v5 and Hopper-v5, 2 environments, SB3's default network, no callback;
- ``callback``: the same with a callback of the user's own (:class:`EpisodeReturnLogger`, the
  first example of SB3's callback documentation: it reads ``infos`` and logs episode returns);
- ``scale``: Humanoid-v5, 8 environments, ``[256, 256]`` actor and critic networks.

``--envs`` and ``--steps`` replace the scenarios' own environments and step counts.

Output (stable; one line per measurement, then one summary line per scenario and environment)::

    run <scenario> <env> <impl> rep=<r> steps_per_s=<x> peak_rss_mb=<m> rollout_s=<a> policy_step_s=<b> critic_s=<c> \
total_s=<t>
    summary <scenario> <env> <impl>=<median steps/s> <compare>=<median steps/s> ratio=<median of per-repetition ratios> \
peak_rss_mb <impl>=<m> <compare>=<m>

``peak_rss_mb`` is the peak resident memory of the training process; when the critic is
fitted in the background (``background_critic_fit``, "auto" by default), plus the memory only
the forked critic worker maps at the end of training (its private pages, from
``/proc/<pid>/smaps_rollup``; the pages it shares with the training process are already
counted there). ``rollout_s`` is the time in
``collect_rollouts`` and ``policy_step_s`` + ``critic_s`` the time in ``train`` (for
implementations without separate phases the whole ``train`` is reported as
``policy_step_s`` and ``critic_s`` is ``nan``; with the critic fitted in the background,
``critic_s`` is the time spent submitting the fit, and waiting for it is part of ``rollout_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

SETTINGS: dict[str, Any] = dict(
    n_steps=1024,
    batch_size=128,
    gamma=0.99,
    gae_lambda=0.95,
    cg_max_steps=25,
    cg_damping=0.1,
    n_critic_updates=20,
    learning_rate=1e-3,
    target_kl=0.01,
)
IMPLEMENTATIONS = ("sb3_trpo", "sb3_contrib")


@dataclass(frozen=True)
class Scenario:
    """Where a user trains: environments, how many copies of each, network sizes, and a callback or not."""

    envs: tuple[str, ...]
    n_envs: int
    steps: int
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    user_callback: bool = False


SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(envs=("HalfCheetah-v5", "Hopper-v5"), n_envs=2, steps=20_480),
    "callback": Scenario(envs=("HalfCheetah-v5", "Hopper-v5"), n_envs=2, steps=20_480, user_callback=True),
    "scale": Scenario(
        envs=("Humanoid-v5",), n_envs=8, steps=32_768, policy_kwargs=dict(net_arch=dict(pi=[256, 256], vf=[256, 256]))
    ),
}


class EpisodeReturnLogger(BaseCallback):
    """A user's callback, as SB3's documentation shows it first: log the return of each finished episode."""

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.logger.record_mean("user/episode_return", info["episode"]["r"])
        return True


def _timed(obj: Any, name: str, totals: dict[str, float], key: str) -> None:
    method = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


BACKGROUND_SETTINGS: dict[str, bool | str] = {"auto": "auto", "true": True, "false": False}


def measure(
    impl: str, env_id: str, steps: int, seed: int, background_critic: str = "auto", scenario: str = "default"
) -> dict[str, float]:
    """Train ``impl`` for ``steps`` environment steps of ``scenario`` in this process and time its phases."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    algorithm: Any
    if impl == "sb3_trpo":
        from sb3_trpo import TRPO as algorithm
    elif impl == "sb3_contrib":
        from sb3_contrib import TRPO as algorithm
    else:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    setting = SCENARIOS[scenario]
    env = VecNormalize(make_vec_env(env_id, n_envs=setting.n_envs, seed=seed))
    options = {"background_critic_fit": BACKGROUND_SETTINGS[background_critic]} if impl == "sb3_trpo" else {}
    model = algorithm("MlpPolicy", env, seed=seed, policy_kwargs=setting.policy_kwargs, **SETTINGS, **options)
    totals: dict[str, float] = defaultdict(float)
    _timed(model, "collect_rollouts", totals, "rollout_s")
    if impl == "sb3_trpo":
        _timed(model, "_policy_step", totals, "policy_step_s")
        _timed(model, "_fit_critic", totals, "critic_s")
    else:
        _timed(model, "train", totals, "policy_step_s")
        totals["critic_s"] = float("nan")
    start = time.perf_counter()
    model.learn(steps, callback=EpisodeReturnLogger() if setting.user_callback else None)
    total = time.perf_counter() - start
    env.close()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fitter = getattr(model, "critic_fitter", None)  # sb3_trpo's models only
    if fitter is not None and fitter.worker is not None:
        peak_kb += _private_kb(fitter.worker.pid)
        fitter.close()
    return dict(
        steps_per_s=model.num_timesteps / total,
        peak_rss_mb=peak_kb / 1024,
        total_s=total,
        **totals,
    )


def _private_kb(pid: int) -> int:
    """Memory only process ``pid`` maps (its pages shared with the training process are counted there)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        fields = dict(line.split()[:2] for line in rollup if line.startswith("Private_"))
    return int(fields["Private_Clean:"]) + int(fields["Private_Dirty:"])


def _run_worker(impl: str, env_id: str, steps: int, seed: int, background_critic: str, scenario: str) -> dict[str, float]:
    command = [sys.executable, "-m", "sb3_trpo.benchmark.speed", "--worker", impl, env_id, str(steps), str(seed)]
    command += ["--background-critic", background_critic, "--scenarios", scenario]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(
    envs: list[str],
    steps: int,
    repetitions: int,
    compare: str,
    seed: int,
    background_critic: str = "auto",
    emit: Callable[[str], None] = print,
    scenario: str = "default",
) -> dict[str, dict[str, Any]]:
    """Alternate ``sb3_trpo`` and ``compare`` in fresh processes; return per-env summaries."""
    summaries: dict[str, dict[str, Any]] = {}
    for env_id in envs:
        results: dict[str, list[dict[str, float]]] = {"sb3_trpo": [], compare: []}
        for repetition in range(repetitions):
            order = ("sb3_trpo", compare) if repetition % 2 == 0 else (compare, "sb3_trpo")
            for impl in order:
                result = _run_worker(impl, env_id, steps, seed, background_critic, scenario)
                results[impl].append(result)
                emit(
                    f"run {scenario} {env_id} {impl} rep={repetition} steps_per_s={result['steps_per_s']:.0f} "
                    f"peak_rss_mb={result['peak_rss_mb']:.0f} rollout_s={result['rollout_s']:.2f} "
                    f"policy_step_s={result['policy_step_s']:.2f} critic_s={result['critic_s']:.2f} "
                    f"total_s={result['total_s']:.2f}"
                )
        pairs = zip(results["sb3_trpo"], results[compare], strict=True)
        ratios = [ours["steps_per_s"] / theirs["steps_per_s"] for ours, theirs in pairs]
        summary: dict[str, Any] = {impl: statistics.median(r["steps_per_s"] for r in runs) for impl, runs in results.items()}
        summary["ratio"] = statistics.median(ratios)
        summary["peak_rss_mb"] = {impl: max(r["peak_rss_mb"] for r in runs) for impl, runs in results.items()}
        summaries[env_id] = summary
        emit(
            f"summary {scenario} {env_id} sb3_trpo={summary['sb3_trpo']:.0f} {compare}={summary[compare]:.0f} "
            f"ratio={summary['ratio']:.2f} peak_rss_mb sb3_trpo={summary['peak_rss_mb']['sb3_trpo']:.0f} "
            f"{compare}={summary['peak_rss_mb'][compare]:.0f}"
        )
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sb3_trpo.benchmark speed", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=["default"])
    parser.add_argument("--envs", nargs="+", help="environments (default: each scenario's own)")
    parser.add_argument("--steps", type=int, help="environment steps per measurement (default: each scenario's own)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--compare", default="sb3_contrib", choices=[i for i in IMPLEMENTATIONS if i != "sb3_trpo"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--background-critic",
        choices=list(BACKGROUND_SETTINGS),
        nargs="?",
        const="true",
        default="auto",
        help="sb3_trpo's background_critic_fit (same numbers; default: auto, the package's default; "
        "the bare flag, as in earlier commands: true)",
    )
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "ENV", "STEPS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, env_id, steps, seed = args.worker
        print(json.dumps(measure(impl, env_id, int(steps), int(seed), args.background_critic, args.scenarios[0])))
        return 0
    for name, value in [("--steps", args.steps), ("--repetitions", args.repetitions)]:
        if value is not None and value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    print(
        f"# settings: VecNormalize MlpPolicy {SETTINGS} background_critic_fit={args.background_critic} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        print(
            f"# scenario {name}: n_envs={scenario.n_envs} policy_kwargs={scenario.policy_kwargs} "
            f"user_callback={scenario.user_callback}"
        )
        envs, steps = args.envs or list(scenario.envs), args.steps or scenario.steps
        run(envs, steps, args.repetitions, args.compare, args.seed, args.background_critic, scenario=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
