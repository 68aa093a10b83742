"""Returns benchmark: train TRPO implementations on environments and seeds, one JSON file per run.

``python -m benchmarks.returns --envs Hopper-v5 HalfCheetah-v5 --seeds 0 1 2 --compare sb3_contrib``, from
the repository's root (the campaign runner is not part of the wheel); ``python -m
sb3_trpo.benchmark report`` turns the run files into a report.

Hyperparameters come from an rl-zoo3 YAML file (``sb3_trpo/zoo_configs/trpo.yml`` when it
exists, else rl-zoo3's own ``hyperparams/trpo.yml``); an environment without an entry of its
own uses the entry of the same task with the highest lower version (``Hopper-v4`` for
``Hopper-v5``), then ``default``. rl-zoo3's :class:`ExperimentManager` turns the entry into
constructor arguments and environments (schedules such as ``lin_1e-3``, ``normalize``,
``n_envs``, ``policy_kwargs`` strings, wrappers), exactly as ``rl_zoo3.train`` does; a
``target_kl`` written ``lin_<start>`` becomes the package's schedule, and sb3-contrib, whose
``target_kl`` is a constant, runs with its start value (recorded in the run file).

Every ``--eval-freq`` environment steps, and once more on the final policy, the policy is
evaluated deterministically on a separate environment whose ``VecNormalize`` statistics are
copied from the training environment and frozen (SB3's ``EvalCallback``).
With ``--record-updates`` the run file also keeps, per update, every ``train/`` value the
implementation logged and the mean return of the latest training episodes.

Each run writes ``<results-dir>/<env>__<impl>__seed<seed>.json.gz`` (gzip-compressed JSON; a
plain ``.json`` of the same run counts as done too) atomically (temporary file, then rename), so
a file that exists is complete and an interrupted campaign resumes by running the command again.
Several processes, on one machine or sharing a file system, can work on the same results
directory: a run is claimed by creating ``<env>__<impl>__seed<seed>.json.lock`` with
``O_CREAT | O_EXCL``, and removed when the run ends, whether it succeeded or failed.
A lock is stale when it names this host and a process id that no longer exists (the worker
was killed); such a lock is reclaimed automatically. A lock written by another host is never
broken automatically: delete it by hand once that host's worker is known to be gone.

With ``--jobs N``, each run is a fresh one-thread process, N at a time. A process that dies
(killed, out of memory) fails its own run only: the others go on, the run is listed as
failed, and the next invocation runs it again (its lock is then stale).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.metadata
import inspect
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import connection, get_context
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback

import sb3_trpo
from sb3_trpo.benchmark.runs import read_run
from sb3_trpo.common.os_process import exit_with_parent
from sb3_trpo.hyperparams import target_kl_schedule

IMPLEMENTATIONS = {"sb3_trpo": "sb3_trpo:TRPO", "sb3_contrib": "sb3_contrib:TRPO"}
PACKAGES = ("sb3_trpo", "stable_baselines3", "sb3_contrib", "rl_zoo3", "torch", "gymnasium", "mujoco", "numpy")
RESULT_FORMAT = 1
LINE_SEARCH_KEY = "train/is_line_search_success"
VALUE_LOSS_KEY = "train/value_loss"


@dataclass(frozen=True)
class RunSpec:
    """One (implementation, environment, seed) run of a campaign."""

    impl: str
    env_id: str
    seed: int
    timesteps: int | None
    config: str
    eval_freq: int
    eval_episodes: int
    record_updates: bool = False

    @property
    def name(self) -> str:
        return f"{self.env_id}__{self.impl}__seed{self.seed}"


# ---------------------------------------------------------------------- config
def default_config() -> Path:
    """The package's tuned ``sb3_trpo/zoo_configs/trpo.yml``."""
    return Path(sb3_trpo.__file__).resolve().parent / "zoo_configs" / "trpo.yml"


def entry_for_env(table: dict[str, Any], env_id: str) -> str:
    """The key of ``table`` that configures ``env_id``: itself, the same task at the highest lower version, or ``default``."""
    if env_id in table:
        return env_id
    task, separator, version = env_id.rpartition("-v")
    if separator and version.isdigit():
        for older in range(int(version) - 1, -1, -1):
            if f"{task}-v{older}" in table:
                return f"{task}-v{older}"
    if "default" in table:
        return "default"
    raise KeyError(f"no entry for {env_id} (nor an older version of it, nor 'default') in the config")


def load_hyperparams(config: str | Path, env_id: str) -> tuple[str, dict[str, Any]]:
    """The entry name and the raw (unprocessed, JSON-compatible) hyperparameters for ``env_id``."""
    with open(config) as file:
        table = yaml.safe_load(file)
    entry = entry_for_env(table, env_id)
    return entry, dict(table[entry])


def algorithm_class(impl: str) -> type[BaseAlgorithm]:
    module, _, name = IMPLEMENTATIONS[impl].partition(":")
    return getattr(importlib.import_module(module), name)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["sb3_trpo_git"] = source_revision()
    return versions


def source_revision() -> str | None:
    """The git commit of the sb3_trpo sources, ``+dirty`` when they have uncommitted changes; None outside git."""
    package = Path(sb3_trpo.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if changes else commit


# ------------------------------------------------------------------- callbacks
class UpdateRecorder(BaseCallback):
    """Reads, once per update, what the update recorded in the logger: ``train/is_line_search_success``
    always, and with ``record_updates`` every ``train/`` value plus the mean return of the latest
    training episodes (SB3's ``rollout/ep_rew_mean``, up to 100 episodes of the stochastic policy).

    ``train()`` runs after the rollout and the logs are dumped before the next ``train()``,
    so the values read at the start of each rollout (and at the end of training) are the ones
    the latest update recorded, read exactly once per update.

    :param record_updates: keep every update's statistics in ``updates``
    """

    def __init__(self, record_updates: bool = False) -> None:
        super().__init__()
        self.record_updates = record_updates
        self.successes: list[float] = []
        self.updates: list[dict[str, float | None]] = []
        self._seen_updates = 0

    def _collect(self) -> None:
        n_updates = int(getattr(self.model, "_n_updates", 0))
        if n_updates > self._seen_updates:
            logged = self.model.logger.name_to_value
            if LINE_SEARCH_KEY in logged:
                self.successes.append(float(logged[LINE_SEARCH_KEY]))
            if self.record_updates:
                self.updates.append(self._statistics(logged))
        self._seen_updates = n_updates

    def _statistics(self, logged: dict[str, Any]) -> dict[str, float | None]:
        episodes = self.model.ep_info_buffer
        statistics: dict[str, float | None] = {
            "timesteps": float(self.model.num_timesteps),
            "rollout/ep_rew_mean": float(np.mean([episode["r"] for episode in episodes])) if episodes else None,
        }
        statistics.update((key, float(value)) for key, value in logged.items() if key.startswith("train/"))
        return statistics

    def _on_rollout_start(self) -> None:
        self._collect()

    def _on_rollout_end(self) -> None:
        # A critic fit that ran in the background during this rollout logged its loss now.
        logged = self.model.logger.name_to_value
        if self.record_updates and self.updates and VALUE_LOSS_KEY in logged:
            self.updates[-1].setdefault(VALUE_LOSS_KEY, float(logged[VALUE_LOSS_KEY]))

    def _on_training_end(self) -> None:
        self._collect()

    def _on_step(self) -> bool:
        return True


class FinalEvalCallback(EvalCallback):
    """``EvalCallback`` that also evaluates the policy ``learn()`` returns, and times its evaluations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_seconds = 0.0

    def _on_step(self) -> bool:
        start = time.perf_counter()
        result = super()._on_step()
        self.eval_seconds += time.perf_counter() - start
        return result

    def _on_training_end(self) -> None:
        if not self.evaluations_timesteps or self.evaluations_timesteps[-1] != self.num_timesteps:
            # An eval_freq of 1 makes the parent evaluate on this call.
            eval_freq, self.eval_freq = self.eval_freq, 1
            self._on_step()
            self.eval_freq = eval_freq


# ------------------------------------------------------------------------ runs
def trust_region_radius(impl: str, kwargs: dict[str, Any]) -> dict[str, float]:
    """
    Turn a ``target_kl`` written as ``lin_<start>`` into the package's schedule, in place (rl-zoo3
    makes schedules of its own keys only), and give sb3-contrib, whose ``target_kl`` is a constant,
    the schedule's start value.

    :param impl: the implementation the keyword arguments are for
    :param kwargs: its constructor arguments, changed in place
    :return: the arguments replaced by a constant, with the constant (empty when none was)
    """
    if isinstance(kwargs.get("target_kl"), str):
        kwargs["target_kl"] = target_kl_schedule(kwargs["target_kl"])
    if impl == "sb3_contrib" and callable(kwargs.get("target_kl")):
        kwargs["target_kl"] = float(kwargs["target_kl"](1.0))
        return {"target_kl": kwargs["target_kl"]}
    return {}


def train_and_evaluate(spec: RunSpec) -> dict[str, Any]:
    """Train one run and return its result record (not written anywhere)."""
    from rl_zoo3.exp_manager import ExperimentManager

    entry, raw = load_hyperparams(spec.config, spec.env_id)
    timesteps = int(spec.timesteps if spec.timesteps is not None else raw.get("n_timesteps", 1e6))
    # The experiment manager only reads the log folder to number its runs; nothing is written there.
    manager = ExperimentManager(
        argparse.Namespace(),
        "trpo",
        spec.env_id,
        log_folder=os.devnull,
        n_timesteps=timesteps,
        seed=spec.seed,
        verbose=0,
        config=spec.config,
    )
    hyperparams = {**raw, "n_timesteps": timesteps}
    kwargs, manager.env_wrapper, _, manager.vec_env_wrapper = manager._preprocess_hyperparams(hyperparams)
    cls = algorithm_class(spec.impl)
    accepted = inspect.signature(cls.__init__).parameters
    dropped = sorted(key for key in kwargs if key not in accepted)
    kwargs = {key: value for key, value in kwargs.items() if key in accepted}
    constant = trust_region_radius(spec.impl, kwargs)

    env = manager.create_envs(manager.n_envs, no_log=True)
    eval_env = manager.create_envs(1, eval_env=True)
    model = cls(env=env, seed=spec.seed, verbose=0, device="cpu", **kwargs)
    updates = UpdateRecorder(spec.record_updates)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Taken before training: the code this process imported, even if the checkout moves meanwhile.
    versions = package_versions()
    # EvalCallback keeps its curve only when it also saves it to a file.
    with tempfile.TemporaryDirectory() as log_path:
        evaluation = FinalEvalCallback(
            eval_env,
            n_eval_episodes=spec.eval_episodes,
            eval_freq=max(spec.eval_freq // manager.n_envs, 1),
            log_path=log_path,
            deterministic=True,
            verbose=0,
        )
        start = time.perf_counter()
        # The recorder comes first: each evaluation dumps (and so clears) the logger.
        model.learn(total_timesteps=timesteps, callback=[updates, evaluation])
        wall_time = time.perf_counter() - start
    env.close()
    eval_env.close()

    results = np.asarray(evaluation.evaluations_results, dtype=float)
    lengths = np.asarray(evaluation.evaluations_length, dtype=float)
    failures = sum(1 for success in updates.successes if success < 1.0)
    n_updates = len(updates.successes)
    train_time = wall_time - evaluation.eval_seconds
    record: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "complete": True,
        "impl": spec.impl,
        "algorithm": f"{cls.__module__}.{cls.__qualname__}",
        "env_id": spec.env_id,
        "seed": spec.seed,
        "total_timesteps": timesteps,
        "num_timesteps": int(model.num_timesteps),
        "config": {
            "path": str(spec.config),
            "entry": entry,
            "hyperparams": raw,
            "dropped_for_impl": dropped,
            "constant_for_impl": constant,
        },
        "evaluation": {
            "freq": spec.eval_freq,
            "episodes": spec.eval_episodes,
            "deterministic": True,
            "timesteps": [int(t) for t in evaluation.evaluations_timesteps],
            "mean": results.mean(axis=1).tolist() if results.size else [],
            "std": results.std(axis=1).tolist() if results.size else [],
            "episode_length_mean": lengths.mean(axis=1).tolist() if lengths.size else [],
        },
        "line_search": {
            "n_updates": n_updates,
            "n_failures": failures,
            "failure_fraction": failures / n_updates if n_updates else None,
        },
        "wall_time_s": wall_time,
        "eval_time_s": evaluation.eval_seconds,
        "steps_per_second": model.num_timesteps / train_time if train_time > 0 else None,
        "versions": versions,
        "host": socket.gethostname(),
        "started_at": started_at,
    }
    if spec.record_updates:
        record["updates"] = updates.updates
    return record


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    """Where the run of ``spec`` is written."""
    return results_dir / f"{spec.name}.json.gz"


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished run (files are renamed into place only when complete)."""
    try:
        record = read_run(path)
    except (OSError, ValueError, EOFError):
        return False
    return isinstance(record, dict) and record.get("complete") is True


def finished_run(results_dir: Path, spec: RunSpec) -> Path | None:
    """The complete run file of ``spec`` in ``results_dir``: the compressed one, or a plain ``.json``; None when neither."""
    written = result_path(results_dir, spec)
    return next((path for path in (written, written.with_suffix("")) if is_complete(path)), None)


def settings_difference(path: Path, spec: RunSpec) -> str:
    """What the settings of the complete run file ``path`` and ``spec`` disagree on ('' when nothing).

    The config is compared by the hyperparameters of the entry it gives for the environment,
    not by its path or the entry's name: the same file read from another checkout, or the same
    values under another name (rl-zoo3's ``Hopper-v4`` entry, the package's ``Hopper-v5``), are
    the same setting. An argument one side leaves unset has the run's algorithm's default
    (``target_kl: 0.01`` written out is TRPO's default, the same setting as no ``target_kl``).
    """
    record = read_run(path)
    ran = {
        "timesteps": record["total_timesteps"],
        "eval-freq": record["evaluation"]["freq"],
        "eval-episodes": record["evaluation"]["episodes"],
    }
    asked = {"timesteps": spec.timesteps, "eval-freq": spec.eval_freq, "eval-episodes": spec.eval_episodes}
    differences = [
        f"{key} {ran[key]} instead of {value}"
        for key, value in asked.items()
        if value is not None and str(value) != str(ran[key])
    ]
    if spec.record_updates and "updates" not in record:
        differences.append("updates not recorded")
    _, hyperparams = load_hyperparams(spec.config, spec.env_id)
    ran_hyperparams = record["config"]["hyperparams"]
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(algorithm_class(spec.impl).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    ran_hyperparams, hyperparams = {**defaults, **ran_hyperparams}, {**defaults, **hyperparams}
    changed = sorted(set(hyperparams) | set(ran_hyperparams), key=str)
    differences += [
        f"{name} {ran_hyperparams.get(name, 'unset')} instead of {hyperparams.get(name, 'unset')} in {spec.config}"
        for name in changed
        if ran_hyperparams.get(name) != hyperparams.get(name)
    ]
    return ", ".join(differences)


def write_run_atomic(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` gzip-compressed to ``path`` through a temporary file, so that ``path`` is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No time stamp in the header: the same record gives the same bytes.
    tmp.write_bytes(gzip.compress((json.dumps(record, indent=1) + "\n").encode(), mtime=0))
    os.replace(tmp, path)


# ----------------------------------------------------------------------- locks
def _lock_owner() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})


def _is_stale(content: str) -> bool:
    """A lock is stale when it was taken on this host by a process that no longer exists."""
    try:
        owner = json.loads(content)
        host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_lock(lock: Path) -> bool:
    """Claim ``lock`` (create it exclusively); reclaim it once if it is stale. True when claimed."""
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                content = lock.read_text()
            except FileNotFoundError:
                continue
            if not _is_stale(content):
                return False
            # Move the stale lock aside before deleting it, so that a lock another worker
            # created in the meantime is put back instead of being deleted.
            aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
            try:
                os.replace(lock, aside)
            except FileNotFoundError:
                continue
            if aside.read_text() != content:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, lock)
            aside.unlink()
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(_lock_owner())
        return True
    return False


def execute(spec: RunSpec, results_dir: Path) -> str:
    """Run ``spec`` unless it is complete or claimed by another worker; returns what happened."""
    if finished_run(results_dir, spec):
        return "done"
    lock = results_dir / f"{spec.name}.json.lock"
    if not try_lock(lock):
        return "locked"
    try:
        if finished_run(results_dir, spec):  # finished by another worker between the check and the claim
            return "done"
        write_run_atomic(result_path(results_dir, spec), train_and_evaluate(spec))
        return "trained"
    finally:
        lock.unlink(missing_ok=True)


def _execute_in_worker(
    spec: RunSpec, results_dir: str, sender: connection.Connection, parent_pid: int, started_by_main_thread: bool
) -> None:
    """A campaign's worker process: one thread, one run; sends back what happened.

    It dies with the campaign's process, even when that is killed (SIGTERM, SIGKILL), which
    runs no ``finally``: a run is never left training unattended.
    """
    exit_with_parent(parent_pid, started_by_main_thread)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        status = execute(spec, Path(results_dir))
    except Exception as error:
        print(f"[{spec.name}] failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        status = "failed"
    if status == "trained":
        print(f"[{spec.name}] trained in {time.perf_counter() - start:.0f} s", flush=True)
    sender.send(status)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def run_campaign(specs: Sequence[RunSpec], results_dir: Path, jobs: int) -> dict[str, list[str]]:
    """Run every incomplete, unclaimed spec, ``jobs`` at a time, each in a fresh one-thread process."""
    results_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, list[str]] = {"done": [], "trained": [], "locked": [], "failed": []}
    pending = []
    for spec in specs:
        finished = finished_run(results_dir, spec)
        if finished:
            outcome["done"].append(spec.name)
            difference = settings_difference(finished, spec)
            if difference:
                print(
                    f"[{spec.name}] kept, although it was run with other settings ({difference}); "
                    "use another --results-dir to run these",
                    file=sys.stderr,
                )
        else:
            pending.append(spec)
    # Processes of our own rather than a pool: a pool breaks, with every run in it, when one process dies.
    context = get_context("spawn")
    waiting = deque(pending)
    running: dict[Any, tuple[RunSpec, SpawnProcess, connection.Connection]] = {}
    statuses: dict[str, str] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                spec = waiting.popleft()
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_execute_in_worker,
                    args=(spec, str(results_dir), sender, os.getpid(), threading.current_thread() is threading.main_thread()),
                    name=spec.name,
                )
                process.start()
                sender.close()  # the child's copy stays open: EOF on the receiver means the child is gone
                running[process.sentinel] = (spec, process, receiver)
            for sentinel in connection.wait(list(running)):
                spec, process, receiver = running.pop(sentinel)
                process.join()
                try:
                    statuses[spec.name] = receiver.recv()
                except EOFError:
                    print(f"[{spec.name}] failed: its process died ({_death(process.exitcode)})", file=sys.stderr, flush=True)
                    statuses[spec.name] = "failed"
                receiver.close()
    finally:
        for _, process, _ in running.values():
            process.terminate()
            process.join()
    for spec in pending:
        outcome[statuses[spec.name]].append(spec.name)
    return outcome


# ------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.returns",
        description="Train TRPO implementations on environments x seeds; one JSON file per run in --results-dir.",
    )
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--impl", nargs="+", choices=sorted(IMPLEMENTATIONS), default=["sb3_trpo"], help="implementations to train"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        choices=sorted(IMPLEMENTATIONS),
        default=[],
        help="implementations to train as well, for comparison (--compare sb3_contrib trains both)",
    )
    parser.add_argument("--timesteps", type=int, default=None, help="steps per run (default: the config's n_timesteps)")
    parser.add_argument("--config", default=None, help="rl-zoo3 YAML (default: sb3_trpo/zoo_configs/trpo.yml)")
    parser.add_argument("--results-dir", default="benchmark_results/returns")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, each a one-thread process")
    parser.add_argument("--eval-freq", type=int, default=20_000, help="environment steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument(
        "--record-updates",
        action="store_true",
        help="also store, per update, every train/ value the algorithm logged and the mean training episode "
        "return (rollout/ep_rew_mean), under 'updates' in the run file (~0.4 MB per 1M-step run)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = str(Path(args.config) if args.config else default_config())
    impls = list(dict.fromkeys([*args.impl, *args.compare]))
    specs = [
        RunSpec(impl, env_id, seed, args.timesteps, config, args.eval_freq, args.eval_episodes, args.record_updates)
        # Seed-major order: a campaign stopped early holds whole seeds of every env and impl.
        for seed in args.seeds
        for env_id in args.envs
        for impl in impls
    ]
    print(f"{len(specs)} runs, config {config}, results in {args.results_dir}", flush=True)
    outcome = run_campaign(specs, Path(args.results_dir), args.jobs)
    print(", ".join(f"{status}: {len(names)}" for status, names in outcome.items()), flush=True)
    for status in ("locked", "failed"):
        for name in outcome[status]:
            print(f"  {status}: {name}")
    return 1 if outcome["failed"] else 0


__all__ = ["RunSpec", "main", "run_campaign", "train_and_evaluate"]

if __name__ == "__main__":
    sys.exit(main())
