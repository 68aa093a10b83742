"""Tune sb3_trpo.TRPO with Optuna alone (no rl-zoo3).

    python examples/tune_optuna.py --env Pendulum-v1 --n-trials 50 --n-timesteps 50000
    python examples/tune_optuna.py --env Pendulum-v1 --storage sqlite:///trpo.db --study-name pendulum
    # more workers: run the same command again, on this machine or another, with the same
    # --storage (postgresql://user:password@host/db across machines) and --study-name;
    # they may start at the same instant on an empty database

Each trial trains with hyperparameters from ``sample_trpo_params``, evaluates the policy
``--n-evaluations`` times during training and reports each mean return to Optuna, whose
median pruner stops trials that fall behind. A shared storage is opened with Optuna's
heartbeat: the trial of a worker that died (killed, out of memory, node lost) is failed
once it has had no heartbeat for ``--grace-period`` seconds, and run again (at most
``--max-retry`` times) by a worker that starts a trial after that. SIGINT or SIGTERM stops
a worker: its running trial becomes FAIL, the reason in its ``fail_reason`` system
attribute, and is enqueued again; the worker reports what finished and exits with
128 + the signal number. At the end the script prints the best parameters and writes, in
``--output-dir``: ``trpo.yml`` (the best trial as a zoo_configs entry), and the
optimization history and parameter importances as HTML (plotly) and PNG (matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import optuna
import yaml
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo import TRPO, NonFiniteError
from sb3_trpo.hyperparams import config_entry, sample_trpo_params
from sb3_trpo.tuning.signals import SignalStop, WorkerStopped
from sb3_trpo.tuning.storage import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    check_env_id,
    check_fault_options,
    check_storage,
    open_storage,
)


class TrialEvalCallback(EvalCallback):
    """Evaluate every ``eval_freq`` steps, report the mean return to the trial, stop when Optuna prunes it."""

    def __init__(self, eval_env: VecEnv, trial: optuna.Trial, n_eval_episodes: int, eval_freq: int):
        super().__init__(eval_env, n_eval_episodes=n_eval_episodes, eval_freq=eval_freq, deterministic=True, verbose=0)
        self.trial = trial
        self.n_reports = 0
        self.is_pruned = False

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            super()._on_step()
            self.trial.report(self.last_mean_reward, self.n_reports)
            self.n_reports += 1
            if self.trial.should_prune():
                self.is_pruned = True
                return False
        return True


def objective(trial: optuna.Trial, args: argparse.Namespace) -> float:
    env = make_vec_env(args.env, n_envs=args.n_envs)
    eval_env = make_vec_env(args.env, n_envs=1)
    action_space = env.action_space
    n_actions = action_space.shape[0] if isinstance(action_space, gym.spaces.Box) else 0
    hyperparams = sample_trpo_params(trial, n_actions, args.n_envs, {})
    model = TRPO("MlpPolicy", env, device="cpu", **hyperparams)
    eval_freq = max(args.n_timesteps // args.n_evaluations // args.n_envs, 1)
    callback = TrialEvalCallback(eval_env, trial, args.n_eval_episodes, eval_freq)
    try:
        model.learn(args.n_timesteps, callback=callback)
    except NonFiniteError as error:
        # Some corners of the search space diverge; that is a bad trial, not a failed study.
        raise optuna.TrialPruned(str(error)) from error
    finally:
        env.close()
        eval_env.close()
    if callback.is_pruned:
        raise optuna.TrialPruned()
    return callback.last_mean_reward


def save_plots(study: optuna.Study, output_dir: Path) -> list[Path]:
    """Optimization history and parameter importances: HTML where plotly is installed, PNG where matplotlib is."""
    plots = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances"}
    saved = []
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the matplotlib backend
    for name, function in plots.items():
        try:
            figure = getattr(optuna.visualization, function)(study)
            figure.write_html(output_dir / f"{name}.html")
            saved.append(output_dir / f"{name}.html")
        except (ImportError, ValueError, RuntimeError) as error:
            print(f"no {name}.html: {error}")
        try:
            axes = getattr(optuna.visualization.matplotlib, function)(study)
            axes.figure.savefig(output_dir / f"{name}.png", bbox_inches="tight")
            saved.append(output_dir / f"{name}.png")
        except (ImportError, ValueError, RuntimeError) as error:
            print(f"no {name}.png: {error}")
    return saved


def write_config(study: optuna.Study, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The best trial as a zoo_configs/trpo.yml entry, with a comment saying where it comes from."""
    best = study.best_trial
    entry = config_entry(best.params, n_envs=args.n_envs, n_timesteps=args.n_timesteps, policy="MlpPolicy")
    n_finished = len([trial for trial in study.trials if trial.state.is_finished()])
    comment = (
        f"# Our tuning: examples/tune_optuna.py, study {study.study_name!r}, best of {n_finished} trials "
        f"of {args.n_timesteps} steps (trial {best.number}, mean return {best.value:.1f}).\n"
    )
    path.write_text(comment + yaml.safe_dump({args.env: entry}, sort_keys=False))
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="Pendulum-v1", help="Gymnasium environment id")
    parser.add_argument("--n-trials", type=int, default=20, help="trials for this worker (0: no limit, until --timeout)")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    parser.add_argument("--n-timesteps", type=int, default=50_000, help="training steps per trial")
    parser.add_argument("--n-envs", type=int, default=1, help="parallel environments per trial")
    parser.add_argument("--n-evaluations", type=int, default=4, help="evaluations (and pruning points) per trial")
    parser.add_argument("--n-eval-episodes", type=int, default=5, help="episodes per evaluation")
    parser.add_argument("--n-startup-trials", type=int, default=5, help="random trials before TPE, and before pruning")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, e.g. sqlite:///trpo.db (default: in memory)")
    parser.add_argument("--study-name", default=None, help="study to create or join (needed to share one)")
    parser.add_argument(
        "--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_INTERVAL, help="seconds between heartbeats of a trial"
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=DEFAULT_GRACE_PERIOD,
        help="seconds without a heartbeat after which a trial's worker counts as dead: the trial is failed and run again",
    )
    parser.add_argument(
        "--max-retry",
        type=int,
        default=DEFAULT_MAX_RETRY,
        help="times a trial whose worker died or was stopped is run again (an integer >= 0; 0: never)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    parser.add_argument("--output-dir", type=Path, default=Path("tune_results"), help="where the config and plots go")
    args = parser.parse_args(argv)
    try:
        check_fault_options(args.heartbeat_interval, args.grace_period, args.max_retry, as_options=True)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Bad input stops here, before a trial trains or the study is opened.
    try:
        check_env_id(args.env)
        check_storage(args.storage)
    except ValueError as error:
        sys.exit(f"error: {error}")

    storage = open_storage(args.storage, args.heartbeat_interval, args.grace_period, args.max_retry) if args.storage else None
    study = optuna.create_study(
        storage=storage,
        study_name=args.study_name,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(n_startup_trials=args.n_startup_trials, seed=args.seed, multivariate=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_evaluations // 3),
    )
    stop = SignalStop(args.max_retry)
    with stop.handling():
        try:
            study.optimize(
                stop.stoppable(lambda trial: objective(trial, args)),
                n_trials=args.n_trials or None,
                timeout=args.timeout,
                gc_after_trial=True,
            )
        except WorkerStopped:
            print(stop.summary(), file=sys.stderr)

    states = [trial.state.name for trial in study.trials]
    print(
        f"Study {study.study_name}: {len(states)} trials, {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned"
    )
    if states.count("COMPLETE") == 0:
        print("error: no trial completed; nothing to report", file=sys.stderr)
        sys.exit(stop.exit_status or 1)
    best = study.best_trial
    print(f"Best trial {best.number}: mean return {best.value:.2f}")
    for name, value in best.params.items():
        print(f"    {name}: {value}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    config_path = args.output_dir / "trpo.yml"
    write_config(study, args, config_path)
    print(f"Config entry: {config_path}")
    for path in save_plots(study, args.output_dir):
        print(f"Plot: {path}")
    if stop.exit_status:
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    main()
