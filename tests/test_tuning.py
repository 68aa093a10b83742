"""Distributed tuning through Optuna's RDB storage (SQLite, PostgreSQL), and the standalone tuning example."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sb3_trpo.hyperparams import config_entry

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tune_optuna.py"
STUDY = "shared"
TRIALS_PER_WORKER = 3


# A worker is the real command line (sb3_trpo.zoo.main, rl-zoo3, Optuna's storage) whose
# sampled trials are cut to 64-step rollouts and 2 critic epochs, so that each trial costs
# a fraction of a second whatever the sampler draws.
WORKER = """
import sys
from dataclasses import replace

from sb3_trpo import zoo
from sb3_trpo.hyperparams import sample_trpo_params


def small_trials(trial, n_actions, n_envs, additional_args):
    hyperparams = sample_trpo_params(trial, n_actions, n_envs, additional_args)
    return {**hyperparams, "n_steps": min(hyperparams["n_steps"], 64), "n_critic_updates": 2}


zoo.ZOO_ALGORITHMS["trpo"] = replace(zoo.ZOO_ALGORITHMS["trpo"], sampler=small_trials)
zoo.main(sys.argv[1:])
"""


def start_worker(storage: str, seed: int, log_folder: Path) -> subprocess.Popen[str]:
    """One tuning worker: 128 steps and one evaluation of one episode per trial."""
    command = [sys.executable, "-c", WORKER, "train", "--algo", "trpo", "--env", "CartPole-v1", "-optimize"]
    command += ["--storage", storage, "--study-name", STUDY, "--n-trials", str(TRIALS_PER_WORKER), "-n", "128"]
    command += ["--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none"]
    command += ["--no-optim-plots", "--num-threads", "1", "--seed", str(seed), "-f", str(log_folder), "-params", "n_envs:1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_two_workers(storage: str, tmp_path: Path) -> list[list[int]]:
    """Two concurrent workers on one study; returns the trial numbers each one logged as finished."""
    # Created once up front, as the README recipe does: concurrent first-time table creation can race.
    optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")
    workers = [start_worker(storage, seed, tmp_path / f"worker{seed}") for seed in (1, 2)]
    finished = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stdout[-2000:] + stderr[-4000:]
        finished.append(sorted(int(n) for n in re.findall(r"Trial (\d+) (?:finished|pruned)", stderr)))
    return finished


def assert_every_trial_finished_once(storage: str, finished: list[list[int]]) -> None:
    total = 2 * TRIALS_PER_WORKER
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert sorted(trial.number for trial in study.trials) == list(range(total))
    assert all(trial.state in (TrialState.COMPLETE, TrialState.PRUNED) for trial in study.trials)
    # Each worker ran the trials it was asked for; together they ran each trial exactly once.
    assert [len(numbers) for numbers in finished] == [TRIALS_PER_WORKER, TRIALS_PER_WORKER]
    assert sorted(finished[0] + finished[1]) == list(range(total))
    # Each trial carries the config entry of its own parameters.
    assert all(trial.user_attrs == config_entry(trial.params) for trial in study.trials)
    # The workers ran at the same time: each one's span of trials overlaps the other's.
    spans = [
        (min(study.trials[n].datetime_start for n in numbers), max(study.trials[n].datetime_complete for n in numbers))
        for numbers in finished
    ]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert_every_trial_finished_once(storage, run_two_workers(storage, tmp_path))


# ------------------------------------------------------------------ PostgreSQL


def postgres_binaries() -> Path | None:
    """Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first), else ``initdb`` on the PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(Path(path).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    for directory in [*candidates, *([str(Path(on_path).parent)] if on_path else [])]:
        if all((Path(directory) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def server_user() -> str | None:
    """PostgreSQL refuses to run as root: then the server runs as ``postgres`` (Debian's package makes it) or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root and neither a 'postgres' nor a 'nobody' user exists to run the PostgreSQL server")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on a Unix socket in a fresh directory; stopped and removed afterwards."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's 'postgresql' package")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    user = server_user()
    # Short path: a Unix socket path must stay under about 100 characters.
    root = Path(tempfile.mkdtemp(prefix="sb3pg"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)

    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, cwd=root, user=user, timeout=120)

    data = root / "data"
    try:
        # UTF8: under SQL_ASCII, psycopg hands text back as bytes.
        run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-N", "-E", "UTF8", "--no-locale")
        # No TCP port: the socket lives in our own directory, so parallel runs cannot collide.
        options = f"-k {root} -c listen_addresses='' -p 5432 -F"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    except subprocess.CalledProcessError as error:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {error.stderr!r}\n{log}") from error
    try:
        yield f"postgresql://postgres@/postgres?host={root}&port=5432"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(postgres_url: str, tmp_path: Path) -> None:
    assert_every_trial_finished_once(postgres_url, run_two_workers(postgres_url, tmp_path))


# ------------------------------------------------------------------ examples/tune_optuna.py


def run_example(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """``python examples/tune_optuna.py ARGS``, in this process."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *args])
    runpy.run_path(str(EXAMPLE), run_name="__main__")


def test_example_tunes_and_writes_best_config_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 'example.db'}"
    output = tmp_path / "results"
    run_example(
        monkeypatch, "--env", "CartPole-v1", "--n-trials", "3", "--n-timesteps", "256", "--n-evaluations", "2",
        "--n-eval-episodes", "2", "--n-startup-trials", "1", "--timeout", "120", "--seed", "0",
        "--storage", storage, "--study-name", "example", "--output-dir", str(output),
    )  # fmt: skip
    study = optuna.load_study(study_name="example", storage=storage)
    finished = [trial for trial in study.trials if trial.state.is_finished()]
    assert len(finished) == 3
    best = study.best_trial
    out = capsys.readouterr().out
    assert f"Best trial {best.number}: mean return {best.value:.2f}" in out
    # The written entry is the best trial's config, with the budget it was tuned on.
    text = (output / "trpo.yml").read_text()
    assert text.startswith("# Our tuning: examples/tune_optuna.py, study 'example', best of 3 trials of 256 steps")
    entry = yaml.safe_load(text)["CartPole-v1"]
    assert entry == {"n_envs": 1, "n_timesteps": 256, "policy": "MlpPolicy", **best.user_attrs}
    for name in ("optimization_history", "param_importances"):
        assert "plotly" in (output / f"{name}.html").read_text()[:100_000].lower()
        assert (output / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--env", "CartPol-v1"], "unknown environment id 'CartPol-v1'; did you mean CartPole-v1"),
        (["--storage", "sqlite//nowhere.db"], "malformed storage URL 'sqlite//nowhere.db'"),
    ],
)
def test_example_stops_on_bad_input_and_leaves_the_study(
    args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "example.db"
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="example", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, params={}, distributions={}))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    arguments = ["--storage", f"sqlite:///{path}", "--study-name", "example", "--output-dir", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as stopped:
        run_example(monkeypatch, *arguments)
    assert expected in str(stopped.value.code)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (tmp_path / "out").exists()
