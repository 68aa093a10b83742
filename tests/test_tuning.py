"""Distributed tuning through Optuna's RDB storage (SQLite, PostgreSQL), and the standalone tuning example."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sb3_trpo.hyperparams import config_entry
from sb3_trpo.tuning.signals import SignalStop, WorkerStopped
from sb3_trpo.tuning.storage import check_fault_options, check_storage, enqueue_unless_measured, open_storage, storage_lock
from tests.helpers import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)

EXAMPLE = REPO / "examples" / "tune_optuna.py"
STUDY = "shared"
TRIALS_PER_WORKER = 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("study.db", "malformed storage URL 'study.db'"),
        ("sqlit:///study.db", "unknown database 'sqlit'"),
        ("sqlite:////nonexistent-dir/study.db", "cannot reach storage 'sqlite:////nonexistent-dir/study.db'"),
    ],
)
def test_unusable_storage_is_named(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_storage(url)


def test_usable_storage_passes_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "study.db"
    optuna.create_study(storage=f"sqlite:///{path}", study_name="kept").add_trial(
        optuna.trial.create_trial(value=1.0, params={}, distributions={})
    )
    before = path.read_bytes()
    check_storage(f"sqlite:///{path}")
    assert path.read_bytes() == before
    assert optuna.load_study(study_name="kept", storage=f"sqlite:///{path}").best_value == 1.0


# A worker is the real command line (sb3_trpo.zoo.main, rl-zoo3, Optuna's storage) whose
# sampled trials are cut to 64-step rollouts (minibatches too) and 2 critic epochs, so that each trial costs
# a fraction of a second whatever the sampler draws. With HOLD set, each trial after the
# first HOLD_AFTER of the worker's study touches HOLD.trial<number> and waits while the file
# HOLD exists: the test knows which trial runs where, and can kill or stop a worker inside it.
WORKER = """
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from sb3_trpo import zoo
from sb3_trpo.hyperparams import sample_trpo_params

n_sampled = 0


def small_trials(trial, n_actions, n_envs, additional_args):
    global n_sampled
    hyperparams = sample_trpo_params(trial, n_actions, n_envs, additional_args)
    if trial.study.study_name != "shared":  # --enqueue-entry's probe of the search space
        return hyperparams
    n_sampled += 1
    if "HOLD" in os.environ and n_sampled > int(os.environ.get("HOLD_AFTER", 0)):
        hold = Path(os.environ["HOLD"])
        hold.with_name(f"{hold.name}.trial{trial.number}").touch()
        while hold.exists():
            time.sleep(0.05)
    n_steps = min(hyperparams["n_steps"], 64)
    return {**hyperparams, "n_steps": n_steps, "batch_size": min(hyperparams["batch_size"], n_steps), "n_critic_updates": 2}


zoo.ZOO_ALGORITHMS["trpo"] = replace(zoo.ZOO_ALGORITHMS["trpo"], sampler=small_trials)
zoo.main(sys.argv[1:])
"""


def start_worker(
    storage: str,
    seed: int,
    log_folder: Path,
    n_trials: int = TRIALS_PER_WORKER,
    options: Sequence[str] = (),
    hold: Path | None = None,
    hold_after: int = 0,
    ignore_sigint: bool = False,
) -> subprocess.Popen[str]:
    """One tuning worker: 128 steps and one evaluation of one episode per trial."""
    command = [sys.executable, "-c", WORKER, "train", "--algo", "trpo", "--env", "CartPole-v1", "-optimize"]
    command += ["--storage", storage, "--study-name", STUDY, "--n-trials", str(n_trials), "-n", "128", *options]
    command += ["--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none"]
    command += ["--no-optim-plots", "--num-threads", "1", "--seed", str(seed), "-f", str(log_folder), "-params", "n_envs:1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hold is not None:
        environment.update(HOLD=str(hold), HOLD_AFTER=str(hold_after))
    # What bash does to a job started with & by a script: the worker inherits an ignored SIGINT.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore
    )


@contextmanager
def reaped(workers: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Whatever happens in the test, no worker outlives it."""
    try:
        yield
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.communicate(timeout=60)


def held_trials(worker: subprocess.Popen[str], hold: Path, count: int = 1, timeout: float = 180) -> list[int]:
    """The numbers of the ``count`` trials in which ``worker`` waits on ``hold`` (see WORKER)."""
    deadline = time.monotonic() + timeout
    while len(markers := list(hold.parent.glob(f"{hold.name}.trial*"))) < count:
        if worker.poll() is not None:
            stdout, stderr = worker.communicate()
            raise AssertionError(f"worker exited with {worker.returncode} before its trial: {stdout[-2000:]}{stderr[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no trial held on {hold} after {timeout} s")
        time.sleep(0.1)
    assert len(markers) == count, markers
    return sorted(int(marker.name.rsplit(".trial", 1)[1]) for marker in markers)


def run_two_workers(storage: str, tmp_path: Path) -> list[list[int]]:
    """
    Two workers started together on an empty storage; returns the trial numbers each one logged as finished.

    Each waits in its first trial until the other is in one too: however late a loaded
    machine starts one of them, they run at the same time.
    """
    holds = [tmp_path / f"hold{seed}" for seed in (1, 2)]
    for hold in holds:
        hold.touch()
    workers = [
        start_worker(storage, seed, tmp_path / f"worker{seed}", hold=hold) for seed, hold in zip((1, 2), holds, strict=True)
    ]
    with reaped(workers):
        for worker, hold in zip(workers, holds, strict=True):
            held_trials(worker, hold)
        for hold in holds:
            hold.unlink()
        outputs = [worker.communicate(timeout=240) for worker in workers]
    finished = []
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
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


def test_postgresql_storage_lock_is_held_by_the_server_until_released(postgres_url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    query = sqlalchemy.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    with engine.connect() as connection:
        with storage_lock(postgres_url):
            assert connection.execute(query).scalar() == 1
        assert connection.execute(query).scalar() == 0
    engine.dispose()


def test_entry_is_enqueued_again_only_when_every_run_of_it_failed() -> None:
    study = optuna.create_study(direction="maximize")
    params = {"x": 1.0}
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 2.0)}

    def run(state: TrialState) -> None:
        trial = study.ask(distributions)
        assert trial.params == params  # the enqueued trial
        study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)

    assert enqueue_unless_measured(study, params)
    assert not enqueue_unless_measured(study, params)  # waiting
    run(TrialState.FAIL)
    assert enqueue_unless_measured(study, params)  # its only run measured nothing
    run(TrialState.COMPLETE)
    assert not enqueue_unless_measured(study, params)
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


# ------------------------------------------------------------------ faults, on PostgreSQL

# Heartbeats every second; a trial without one for 4 s has lost its worker.
HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "4")
GRACE_PERIOD = 4
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def test_killed_worker_trial_fails_and_is_run_again_by_a_survivor(postgres_url: str, tmp_path: Path) -> None:
    holds = [tmp_path / f"hold{seed}" for seed in range(3)]
    for hold in holds:
        hold.touch()
    # Three workers started together on an empty database, each passing --enqueue-entry.
    workers = [
        start_worker(postgres_url, seed, tmp_path / f"worker{seed}", 2, [*HEARTBEAT, "--enqueue-entry"], hold)
        for seed, hold in enumerate(holds)
    ]
    victim, survivors = workers[0], workers[1:]
    with reaped(workers):
        (killed_number,) = held_trials(victim, holds[0])
        for worker, hold in zip(survivors, holds[1:], strict=True):
            held_trials(worker, hold)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        # A precondition, not a measurement: the victim's last heartbeat is now older than the grace period.
        time.sleep(GRACE_PERIOD + 1)
        for hold in holds[1:]:
            hold.unlink()
        outputs = [worker.communicate(timeout=240) for worker in survivors]
    for worker, (stdout, stderr) in zip(survivors, outputs, strict=True):
        assert worker.returncode == 0, stdout[-2000:] + stderr[-4000:]

    trials = optuna.load_study(study_name=STUDY, storage=postgres_url).trials
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    # A survivor found it dead when it started its next trial, and ran it again with the same parameters.
    (retry,) = [trial for trial in trials if trial.system_attrs.get("failed_trial") == killed_number]
    assert retry.state in FINISHED and retry.params == killed.params
    assert not [trial for trial in trials if trial.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The survivors ran the 2 + 2 trials they were asked for, the retry among them.
    assert sorted(trial.state in FINISHED for trial in trials) == [False] + [True] * 4
    # The entry was enqueued once by the three workers, and a run of it finished.
    entry_runs = [trial for trial in trials if "fixed_params" in trial.system_attrs]
    assert len([trial for trial in entry_runs if "failed_trial" not in trial.system_attrs]) == 1
    assert [trial.params for trial in entry_runs if trial.state in FINISHED] == [entry_runs[0].system_attrs["fixed_params"]]


def test_stopped_workers_fail_their_trial_enqueue_it_again_and_report(postgres_url: str, tmp_path: Path) -> None:
    stops = (signal.SIGINT, signal.SIGTERM)
    outputs = []
    for seed, stop in enumerate(stops):
        hold = tmp_path / f"hold{seed}"
        hold.touch()
        # The first worker inherits an ignored SIGINT, as a job started with & by a script does.
        worker = start_worker(
            postgres_url, seed, tmp_path / f"worker{seed}", 3, HEARTBEAT, hold, hold_after=1, ignore_sigint=seed == 0
        )
        with reaped([worker]):
            held_trials(worker, hold)  # its second trial, after a first one finished
            worker.send_signal(stop)
            outputs.append(worker.communicate(timeout=120))
        assert worker.returncode == 128 + stop, outputs[-1][1][-4000:]

    trials = optuna.load_study(study_name=STUDY, storage=postgres_url).trials
    states = [trial.state for trial in trials]
    # Worker 0: trial 0 finished, trial 1 stopped by SIGINT and enqueued again as trial 2.
    # Worker 1: trial 2 (the retry, waiting trials first), then trial 3 stopped by SIGTERM, enqueued as trial 4.
    assert states[0] in FINISHED and states[2] in FINISHED
    assert (states[1], states[3], states[4]) == (TrialState.FAIL, TrialState.FAIL, TrialState.WAITING)
    assert [trials[n].system_attrs["fail_reason"] for n in (1, 3)] == ["worker stopped by SIGINT", "worker stopped by SIGTERM"]
    assert [trials[n].system_attrs["failed_trial"] for n in (2, 4)] == [1, 3]
    assert trials[2].params == trials[1].params and trials[4].params == trials[3].params
    for seed, ((stdout, stderr), stopped) in enumerate(zip(outputs, (1, 3), strict=True)):
        assert f"trial {stopped} failed and enqueued again" in stderr
        # What rl-zoo3 writes at the end of an optimization: the best trial and the report.
        assert "Best trial:" in stdout
        assert len(list((tmp_path / f"worker{seed}" / "trpo").glob("report_CartPole-v1_3-trials-128-random-none_*.csv"))) == 1


# ------------------------------------------------------------------ stops and retries, on SQLite


def trials_of(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).trials


def test_worker_stopped_before_any_trial_completed_says_so_and_exits_with_the_signal(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    hold = tmp_path / "hold"
    hold.touch()
    # --max-retry 0: the stopped trial is not run again.
    worker = start_worker(storage, 0, tmp_path / "worker", 2, ["--max-retry", "0"], hold)
    with reaped([worker]):
        assert held_trials(worker, hold) == [0]  # the first trial of a fresh study
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    # One line says what happened; no traceback, neither rl-zoo3's (no best trial) nor Optuna's (the failed trial's).
    assert stderr.splitlines()[-1] == (
        "Stopped by SIGTERM: trial 0 failed; no trial of the study has completed: no best trial, no report"
    )
    assert "Traceback" not in stderr and "Record does not exist" not in stderr
    (stopped,) = trials_of(storage)
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["fail_reason"] == "worker stopped by SIGTERM"


def test_stop_fails_every_trial_running_in_threads_of_a_worker(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    hold = tmp_path / "hold"
    hold.touch()
    # Two trials at a time in threads (--n-jobs 2): the first two finish, the next two wait on the hold.
    worker = start_worker(storage, 0, tmp_path / "worker", 6, ["--n-jobs", "2"], hold, hold_after=2)
    with reaped([worker]):
        stopped_numbers = held_trials(worker, hold, count=2)
        worker.send_signal(signal.SIGINT)
        # A precondition, not a measurement: the main thread has handled the signal before the trials go on.
        time.sleep(2)
        hold.unlink()  # the held trials start training, and stop at their first step
        stdout, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 128 + signal.SIGINT, stderr[-4000:]
    first, second = stopped_numbers
    assert f"Stopped by SIGINT: trials {first}, {second} failed and enqueued again" in stderr
    assert "Traceback" not in stderr
    trials = trials_of(storage)
    by_state = {state: [trial.number for trial in trials if trial.state == state] for state in TrialState}
    assert by_state[TrialState.FAIL] == stopped_numbers
    assert [trials[n].system_attrs["fail_reason"] for n in stopped_numbers] == ["worker stopped by SIGINT"] * 2
    # Each stopped trial waits to be run again with its parameters; no trial is left RUNNING, none started after the stop.
    assert (
        sorted(trial.system_attrs["failed_trial"] for trial in trials if trial.state == TrialState.WAITING) == stopped_numbers
    )
    assert all(
        trial.params == trials[trial.system_attrs["failed_trial"]].params
        for trial in trials
        if "failed_trial" in trial.system_attrs
    )
    assert by_state[TrialState.RUNNING] == [] and len(trials) == 6
    assert len(by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]) == 2
    # rl-zoo3 wrote its report: the two finished trials make a best trial.
    assert "Best trial:" in stdout


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("max_retry", [0, 2])
def test_dead_worker_trial_is_run_again_at_most_max_retry_times(max_retry: int, tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2, max_retry=max_retry)
    study = optuna.create_study(storage=storage, direction="maximize")
    assert isinstance(storage, optuna.storages.RDBStorage)
    stale_trial_callback = storage.get_heartbeat_stale_trial_callback()
    assert stale_trial_callback is not None
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    # What Optuna does to a trial without a heartbeat for the grace period, for as long as a copy waits.
    for _ in range(10):
        stale_trial_callback(study, study.trials[trial.number])
        study.tell(trial, state=TrialState.FAIL)
        if not study.get_trials(states=(TrialState.WAITING,)):
            break
        trial = study.ask()
    trials = study.trials
    assert len(trials) == 1 + max_retry and all(trial.state == TrialState.FAIL for trial in trials)
    assert all(trial.params == trials[0].params for trial in trials)


def test_stopped_trial_is_run_again_at_most_max_retry_times(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.enqueue_trial({"x": 0.5})
    stop = SignalStop(max_retry=1)
    stop.signum = signal.SIGTERM  # as the handler records a signal
    objective = stop.stoppable(lambda trial: trial.suggest_float("x", 0.0, 1.0))
    for _ in range(2):
        trial = study.ask()
        with pytest.raises(WorkerStopped):
            objective(trial)
        study.tell(trial, state=TrialState.FAIL)  # what Optuna does with the exception
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert study.trials[1].system_attrs["failed_trial"] == 0
    assert stop.stopped_trials == [0, 1] and stop.enqueued_again == [0]
    assert stop.summary() == "Stopped by SIGTERM: trials 0, 1 failed, trial 0 enqueued again"
    assert stop.exit_status == 143


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ((1, 1, 3), "grace_period (1) must exceed heartbeat_interval (1), and both be positive"),
        ((0, 5, 3), "grace_period (5) must exceed heartbeat_interval (0), and both be positive"),
        ((1, 2, -1), "max_retry must be an integer >= 0 (the times a trial whose worker died or was stopped is run again"),
        ((1, 2, 1.5), "max_retry must be an integer >= 0"),
        ((1, 2, True), "max_retry must be an integer >= 0"),
    ],
)
def test_open_storage_refuses_fault_options_out_of_range(options: tuple[int, int, int], expected: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_storage(url, *options)
    assert not (tmp_path / "study.db").exists()
    check_fault_options(1, 2, 0)  # the smallest usable values


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
    assert all(trial.user_attrs["batch_size"] <= trial.user_attrs["n_steps"] for trial in finished)
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


# examples/tune_optuna.py as a worker process whose trials, from the HOLD_AFTER-th on, wait
# while the file HOLD exists (as WORKER's do), so that a signal reaches it inside a trial.
EXAMPLE_WORKER = """
import os
import runpy
import sys
import time
from pathlib import Path

import sb3_trpo.hyperparams

sample_trpo_params = sb3_trpo.hyperparams.sample_trpo_params


def held_trials(trial, *args):
    hyperparams = sample_trpo_params(trial, *args)
    if trial.number >= int(os.environ["HOLD_AFTER"]):
        hold = Path(os.environ["HOLD"])
        hold.with_name(f"{hold.name}.trial{trial.number}").touch()
        while hold.exists():
            time.sleep(0.05)
    return hyperparams


sb3_trpo.hyperparams.sample_trpo_params = held_trials  # before the example imports it
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_example_stopped_by_a_signal_fails_its_trial_reports_and_exits_with_the_signal(tmp_path: Path) -> None:
    storage = str(tmp_path / "study.log")  # an Optuna journal file
    hold, output = tmp_path / "hold", tmp_path / "results"
    hold.touch()
    command = [
        sys.executable, "-c", EXAMPLE_WORKER, str(EXAMPLE), "--env", "CartPole-v1", "--n-trials", "3",
        "--n-timesteps", "256", "--n-evaluations", "2", "--n-eval-episodes", "2", "--n-startup-trials", "1",
        "--seed", "0", "--storage", storage, "--study-name", STUDY, "--output-dir", str(output),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HOLD": str(hold), "HOLD_AFTER": "1"}
    worker = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped([worker]):
        assert held_trials(worker, hold) == [1]  # after trial 0 finished
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    assert "Stopped by SIGTERM: trial 1 failed and enqueued again" in stderr and "Traceback" not in stderr
    journal = optuna.storages.JournalStorage(JournalFileBackend(storage))
    finished, stopped, retry = optuna.load_study(study_name=STUDY, storage=journal).trials
    assert finished.state == TrialState.COMPLETE
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["fail_reason"] == "worker stopped by SIGTERM"
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 1 and retry.params == stopped.params
    # What finished is reported, as at the end of a run.
    assert f"Best trial 0: mean return {finished.value:.2f}" in stdout
    assert yaml.safe_load((output / "trpo.yml").read_text())["CartPole-v1"]["n_timesteps"] == 256


def test_example_refuses_max_retry_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_example(monkeypatch, "--max-retry", "-1", "--output-dir", str(tmp_path / "out"))
    assert stopped.value.code == 2  # argparse's usage error
    assert "error: --max-retry must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
