"""rl-zoo3 integration: registration, the shipped config, train/enjoy/optimize, and bad input stopped before training."""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend
from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER
from rl_zoo3.utils import ALGOS

import sb3_trpo
from sb3_trpo import NPG, TRPO
from sb3_trpo.hyperparams import config_entry, sample_npg_params, sample_trpo_params, target_kl_schedule
from sb3_trpo.tuning.signals import WorkerStopped
from sb3_trpo.zoo import CONFIG_DIR, CheckedExperimentManager, main, register
from tests.helpers import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)

LISTED_ENVS = [
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Pendulum-v1",
    "LunarLander-v3",
    "LunarLanderContinuous-v3",
    "BipedalWalker-v3",
    "HalfCheetah-v5",
    "Hopper-v5",
    "Walker2d-v5",
    "Ant-v5",
    "Swimmer-v5",
    "Humanoid-v5",
    "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5",
    "Reacher-v5",
]
BOX2D_ENVS = {"LunarLander-v3", "LunarLanderContinuous-v3", "BipedalWalker-v3"}


@pytest.fixture
def rl_zoo3_registries() -> Iterator[None]:
    """Restore rl-zoo3's registries after a test that changes them."""
    saved = [(registry, dict(registry)) for registry in (ALGOS, HYPERPARAMS_SAMPLER, HYPERPARAMS_CONVERTER)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


def run_zoo(*args: str) -> str:
    """``python -m sb3_trpo.zoo ARGS`` in this process; returns the error message when it stops on bad input."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    return str(stopped.value.code)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def existing_study(tmp_path: Path) -> tuple[str, Path]:
    """A SQLite study ``pendulum`` with two finished trials: what bad input must leave as it is."""
    path = tmp_path / "study.db"
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name="pendulum", direction="maximize")
    for value in (-900.0, -700.0):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    return url, path


def test_register_binds_package_classes_samplers_and_converter(rl_zoo3_registries: None) -> None:
    registered = register()
    assert {"trpo", "npg"} <= set(registered)
    assert ALGOS["trpo"] is TRPO and ALGOS["npg"] is NPG
    assert HYPERPARAMS_SAMPLER["trpo"] is sample_trpo_params and HYPERPARAMS_SAMPLER["npg"] is sample_npg_params
    assert HYPERPARAMS_CONVERTER["trpo"] is config_entry


def test_variants_are_registered_only_when_the_package_defines_them(
    rl_zoo3_registries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(sb3_trpo, "MaskableTRPO", raising=False)
    monkeypatch.delattr(sb3_trpo, "RecurrentTRPO", raising=False)
    # Another test in this process may have registered them already.
    ALGOS.pop("trpo_mask", None)
    ALGOS.pop("trpo_lstm", None)
    assert "trpo_mask" not in register() and "trpo_mask" not in ALGOS

    class MaskableTRPO(TRPO):
        pass

    monkeypatch.setattr(sb3_trpo, "MaskableTRPO", MaskableTRPO, raising=False)
    assert "trpo_mask" in register()
    assert ALGOS["trpo_mask"] is MaskableTRPO and "trpo_lstm" not in ALGOS


def test_package_config_has_a_sourced_entry_for_every_listed_env() -> None:
    text = (CONFIG_DIR / "trpo.yml").read_text()
    config = yaml.safe_load(text)
    assert set(LISTED_ENVS) <= set(config)
    lines = text.splitlines()
    for env_id in LISTED_ENVS:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{env_id}:")]
        comment = lines[index - 1]
        assert comment.startswith("#"), f"{env_id} has no comment saying where its values come from"
        assert "rl-zoo3" in comment, f"{env_id}'s comment does not name the rl-zoo3 entry it starts from"
        if comment.startswith("# Tuned by us"):
            assert "tuning README" in comment and "BENCHMARKS.md" in comment, f"{env_id} does not point to its results"
    # The top-level zoo_configs folder of a checkout is the package's.
    assert (REPO / "zoo_configs" / "trpo.yml").read_text() == text


# A measured figure: a mean +- spread, a percentage, a speed ratio, or a number of three digits or
# more (returns, steps per second); config values quoted in prose (1e6, 0.01, v5, 2500 steps) and
# years do not match.
MEASURED_FIGURE = re.compile(
    r"\+-|±|%|\d\.\d+x\b|(?<![\w.])(?!(?:19|20)\d\d\b)(?:\d{1,3}(?:,\d{3})+|\d{3,})(?:\.\d+)?(?![\w.]| steps)"
)


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIG_DIR.glob("*.yml")))
def test_package_configs_quote_no_measured_figures(config: str) -> None:
    """Figures live in BENCHMARKS.md and the tuning README, where they are regenerated; a config only points there."""
    comments = [line for line in (CONFIG_DIR / config).read_text().splitlines() if line.lstrip().startswith("#")]
    assert comments
    assert [line for line in comments if MEASURED_FIGURE.search(line)] == []


def test_measured_figure_pattern_finds_the_figures_configs_used_to_quote() -> None:
    for quoted in ("sb3_trpo 6849 +- 689", "final over best 94%", "rl-zoo3's entry: 839 and 597", "4,096 samples", "2.06x"):
        assert MEASURED_FIGURE.search(quoted), quoted
    for allowed in ("1e6-step budget", "target_kl 0.03", "Walker2d-v5", "dim=20, n=10", "2500 steps", "2018"):
        assert not MEASURED_FIGURE.search(allowed), allowed


@pytest.mark.parametrize("env_id", LISTED_ENVS)
def test_every_package_config_entry_builds_a_trpo_model(
    env_id: str, tmp_path: Path, rl_zoo3_registries: None
) -> None:
    if env_id in BOX2D_ENVS:
        pytest.importorskip("Box2D", reason=f"{env_id} needs gymnasium[box2d]")
    if env_id.endswith("-v5"):
        pytest.importorskip("mujoco", reason=f"{env_id} needs gymnasium[mujoco]")
    register()
    manager = CheckedExperimentManager(
        argparse.Namespace(), "trpo", env_id, str(tmp_path), config=str(CONFIG_DIR / "trpo.yml")
    )
    hyperparams, _ = manager.read_hyperparameters()
    # Raises ZooInputError unless TRPO builds on the environment from this entry.
    kwargs, *_ = manager._preprocess_hyperparams(hyperparams)
    assert manager.n_timesteps >= 50_000 and kwargs["policy"] == "MlpPolicy"


def test_wheel_ships_the_default_config(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "sb3_trpo", source / "sb3_trpo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sb3_trpo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("sb3_trpo/zoo_configs/trpo.yml").decode()
    assert shipped == (CONFIG_DIR / "trpo.yml").read_text()


def test_train_then_enjoy_with_the_package_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    options = "--algo trpo --env CartPole-v1 -n 512 --seed 3 --eval-freq 256 --save-freq 256 -params n_steps:64 n_envs:1"
    main(["train", *options.split(), "-f", str(logs), "-tb", str(tmp_path / "tb")])
    run = logs / "trpo" / "CartPole-v1_1"
    args = yaml.unsafe_load((run / "CartPole-v1" / "args.yml").read_text())
    assert Path(args["conf_file"]) == CONFIG_DIR / "trpo.yml"
    saved_config = yaml.unsafe_load((run / "CartPole-v1" / "config.yml").read_text())
    entry = yaml.safe_load((CONFIG_DIR / "trpo.yml").read_text())["CartPole-v1"]
    assert dict(saved_config) == {**entry, "n_steps": 64, "n_envs": 1}
    model = TRPO.load(run / "CartPole-v1.zip")
    assert type(model) is TRPO and model.n_steps == 64 and model.cg_damping == 1e-3 and model.num_timesteps == 512
    assert (run / "rl_model_512_steps.zip").is_file() and (run / "evaluations.npz").is_file()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))

    capsys.readouterr()
    main(["enjoy", "--algo", "trpo", "--env", "CartPole-v1", "-f", str(logs), "--no-render", "-n", "1000", "--seed", "0"])
    out = capsys.readouterr().out
    assert f"Loading {run / 'CartPole-v1.zip'}" in out
    assert re.search(r"Mean reward: [0-9.]+", out)


def test_optimize_stores_trials_and_a_trial_trains_from_its_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--algo", "trpo", "--env", "Pendulum-v1", "-f", str(tmp_path / "logs"), "--storage", url, "--study-name", "p"]
    tuning = "-optimize --n-trials 2 --n-jobs 2 -n 128 --n-evaluations 1 --sampler random --pruner median"
    main(
        [
            "train",
            *common,
            *tuning.split(),
            "--n-startup-trials",
            "1",
            "--no-optim-plots",
            "--seed",
            "1",
            "-params",
            "n_envs:1",
        ]
    )
    study = optuna.load_study(study_name="p", storage=url)
    assert len(study.trials) == 2 and all(trial.state.is_finished() for trial in study.trials)
    best = study.best_trial
    assert best.user_attrs == config_entry(best.params)
    assert list((tmp_path / "logs" / "trpo").glob("report_Pendulum-v1_2-trials-128-random-median_*.csv"))

    # --trial-id trains with that trial's hyperparameters (rl-zoo3 skips trial 0); the saved config is its entry.
    trial = study.trials[1]
    main(["train", *common, "--trial-id", "1", "-n", "64", "--eval-freq", "-1", "-params", "n_envs:1", "n_steps:64"])
    (model_path,) = (tmp_path / "logs" / "trpo").glob("Pendulum-v1_*/Pendulum-v1.zip")
    saved = yaml.unsafe_load((model_path.parent / "Pendulum-v1" / "config.yml").read_text())
    assert saved["policy_kwargs"] == trial.user_attrs["policy_kwargs"]
    model = TRPO.load(model_path)
    # The entry writes a linear target_kl as "lin_<start>", rl-zoo3's spelling; the model holds the schedule.
    entry_kl = trial.user_attrs["target_kl"]
    assert model.target_kl == (target_kl_schedule(entry_kl) if isinstance(entry_kl, str) else pytest.approx(entry_kl))
    assert model.gamma == pytest.approx(trial.user_attrs["gamma"])
    assert model.policy_kwargs["activation_fn"].__name__.lower() == trial.params["activation_fn"]


def test_enqueue_entry_makes_the_config_entry_a_trial_once(tmp_path: Path) -> None:
    storage = str(tmp_path / "study.log")  # rl-zoo3's journal file storage
    command = [
        "train", "--algo", "trpo", "--env", "Pendulum-v1", "-f", str(tmp_path / "logs"), "--storage", storage,
        "--study-name", "p", "-optimize", "--enqueue-entry", "--n-trials", "1", "--n-jobs", "1", "-n", "64",
        "--n-evaluations", "1", "--sampler", "random", "--pruner", "none", "--no-optim-plots", "--seed", "1",
        "-params", "n_envs:1", "n_steps:64", "batch_size:64", "learning_rate:0.002",
    ]  # fmt: skip
    main(command)
    main(command)  # a second worker of the same study: the entry is not enqueued again
    study = optuna.load_study(study_name="p", storage=optuna.storages.JournalStorage(JournalFileBackend(storage)))
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    first, second = (trial.user_attrs for trial in study.trials)
    # The package's Pendulum-v1 entry, with the -params overrides; what it leaves out, TRPO's defaults.
    entry = {
        "n_steps": 64,
        "gamma": 0.9,
        "n_critic_updates": 15,
        "learning_rate": 0.002,
        "target_kl": 0.01,
        "gae_lambda": 0.95,
        "batch_size": 64,
    }
    assert {name: first[name] for name in entry} == pytest.approx(entry)
    assert first["policy_kwargs"] == (
        "dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh, ortho_init=True, log_std_init=0.0)"
    )
    assert second != first


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--enqueue-entry needs --storage and --study-name"),
        (
            ["--storage", "STUDY", "--study-name", "pendulum", "-params", "n_steps:1000"],
            "n_steps=1000 in the config entry is outside",
        ),
    ],
)  # fmt: skip
def test_enqueue_entry_stops_on_bad_input_before_training_and_leaves_the_study(
    extra: list[str], expected: str, tmp_path: Path, existing_study: tuple[str, Path]
) -> None:
    url, path = existing_study
    before = sha256(path)
    extra = [url if arg == "STUDY" else arg for arg in extra]
    message = run_zoo(
        "train", "--algo", "trpo", "--env", "Pendulum-v1", "-optimize", "--enqueue-entry", "-f", str(tmp_path / "logs"),
        *extra,
    )  # fmt: skip
    assert expected in message
    assert sha256(path) == before and not (tmp_path / "logs").exists()


def test_stop_signal_between_trials_fails_the_next_trial_before_it_trains_and_enqueues_it_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="p", direction="maximize")
    study.enqueue_trial({"target_kl": 0.02})
    manager = CheckedExperimentManager(argparse.Namespace(), "trpo", "CartPole-v1", str(tmp_path), storage=url, study_name="p")
    manager._stop.signum = signal.SIGTERM  # as the handler records a signal that came while no trial ran
    trial = study.ask()
    with pytest.raises(WorkerStopped):
        manager.objective(trial)  # nothing trained: no environment or model was made
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what Optuna does with the exception
    stopped, retry = optuna.load_study(study_name="p", storage=url).trials
    assert stopped.system_attrs["fail_reason"] == "worker stopped by SIGTERM"
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert retry.system_attrs["fixed_params"] == {"target_kl": 0.02}


@pytest.mark.parametrize(
    "option", [["--enqueue-entry"], ["--heartbeat-interval", "5"], ["--grace-period=20"], ["--max-retry", "0"]]
)
def test_tuning_options_without_optimize_are_refused(option: list[str], tmp_path: Path) -> None:
    message = run_zoo("train", "--algo", "trpo", "--env", "Pendulum-v1", *option, "-f", str(tmp_path))
    assert f"{option[0].split('=')[0]} is an option of tuning: it needs -optimize" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("heartbeat", "expected"),
    [
        (["--heartbeat-interval", "60", "--grace-period", "60"], "--grace-period (60) must exceed --heartbeat-interval (60)"),
        (["--grace-period", "30"], "--grace-period (30) must exceed --heartbeat-interval (60)"),
        (["--heartbeat-interval", "0"], "--grace-period (180) must exceed --heartbeat-interval (0), and both be positive"),
        (["--heartbeat-interval", "1m"], "argument --heartbeat-interval: invalid int value: '1m'"),
        (["--max-retry", "-1"], "--max-retry must be an integer >= 0 (the times a trial whose worker died or was stopped"),
        (["--max-retry", "2.5"], "argument --max-retry: invalid int value: '2.5'"),
    ],
)
def test_fault_options_out_of_range_are_refused(
    heartbeat: list[str], expected: str, tmp_path: Path, existing_study: tuple[str, Path]
) -> None:
    url, path = existing_study
    before = sha256(path)
    message = run_zoo(
        "train", "--algo", "trpo", "--env", "Pendulum-v1", "-optimize", "--storage", url, "--study-name", "pendulum",
        *heartbeat, "-f", str(tmp_path / "logs"),
    )  # fmt: skip
    assert expected in message
    assert sha256(path) == before and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ bad input


def test_unknown_env_id_stops_before_training_and_leaves_the_study(tmp_path: Path, existing_study: tuple[str, Path]) -> None:
    url, path = existing_study
    before = sha256(path)
    message = run_zoo(
        "train", "--algo", "trpo", "--env", "Pendulumm-v1", "-optimize", "--storage", url, "--study-name", "pendulum",
        "-f", str(tmp_path / "logs"),
    )  # fmt: skip
    assert "unknown environment id 'Pendulumm-v1'" in message and "did you mean Pendulum-v1" in message
    assert sha256(path) == before and not (tmp_path / "logs").exists()


BAD_ENTRIES = {
    "unknown": ("tarket_kl: 0.02", "unknown hyperparameter 'tarket_kl' for TRPO", "did you mean 'target_kl'"),
    "invalid value": ("target_kl: -0.01", "invalid hyperparameter", "target_kl must be > 0 (or a schedule"),
    "invalid policy_kwargs": ('policy_kwargs: "dict(net_archs=[8])"', "invalid hyperparameter", "net_archs"),
    "unparsable policy_kwargs": ('policy_kwargs: "dict(net_arch=[8]"', "invalid hyperparameter", "'dict(net_arch=[8]'"),
    "set by the command line": ("seed: 3", "'seed'", "set by rl-zoo3's command line"),
}


@pytest.mark.parametrize("optimize", [True, False], ids=["optimize", "train"])
@pytest.mark.parametrize("bad_entry", list(BAD_ENTRIES))
def test_bad_config_entry_stops_before_training_and_leaves_the_study(
    bad_entry: str, optimize: bool, tmp_path: Path, existing_study: tuple[str, Path]
) -> None:
    line, *expected = BAD_ENTRIES[bad_entry]
    config = tmp_path / "mine.yml"
    config.write_text(f"Pendulum-v1:\n  n_timesteps: 1000\n  policy: 'MlpPolicy'\n  n_steps: 64\n  {line}\n")
    url, path = existing_study
    before = sha256(path)
    optimize_args = ["-optimize", "--storage", url, "--study-name", "pendulum"] if optimize else []
    message = run_zoo(
        "train", "--algo", "trpo", "--env", "Pendulum-v1", "--conf-file", str(config), "-f", str(tmp_path / "logs"),
        *optimize_args,
    )  # fmt: skip
    for part in expected:
        assert part in message
    assert str(config) in message
    assert sha256(path) == before and not (tmp_path / "logs").exists()


def test_invalid_value_from_params_is_named(tmp_path: Path) -> None:
    message = run_zoo("train", "--algo", "npg", "--env", "CartPole-v1", "-params", "gamma:1.5", "-f", str(tmp_path))
    assert "gamma must be in (0, 1], got 1.5" in message and "-params" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("study.db", "malformed storage URL 'study.db'"),
        ("sqlit:///study.db", "unknown database 'sqlit'"),
        ("sqlite:////nonexistent-dir/study.db", "cannot reach storage 'sqlite:////nonexistent-dir/study.db'"),
        (
            "postgresql://someone:secret@127.0.0.1:9/optuna",
            "cannot reach storage 'postgresql://someone:***@127.0.0.1:9/optuna'",
        ),
    ],
)
def test_unusable_storage_stops_before_training(storage: str, expected: str, tmp_path: Path) -> None:
    if storage.startswith("postgresql"):
        pytest.importorskip("psycopg", reason="the postgresql:// case needs psycopg (pip install 'psycopg[binary]')")
    message = run_zoo(
        "train", "--algo", "trpo", "--env", "Pendulum-v1", "-optimize", "--storage", storage, "--study-name", "p",
        "-n", "64", "-f", str(tmp_path / "logs"),
    )  # fmt: skip
    assert expected in message and "secret" not in message
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("algo", "env_id", "policy"),
    [
        ("trpo_lstm", "PendulumNoVel-v1", "MlpLstmPolicy"),
        ("trpo_lstm", "CartPoleNoVel-v1", "MlpLstmPolicy"),
        ("trpo_mask", "InvalidActionEnvDiscrete-v0", "MlpPolicy"),
    ],
)
def test_variant_config_entries_build_their_models(
    algo: str, env_id: str, policy: str, tmp_path: Path, rl_zoo3_registries: None
) -> None:
    import rl_zoo3.import_envs  # noqa: F401  (registers the NoVel tasks)

    register()
    manager = CheckedExperimentManager(
        argparse.Namespace(), algo, env_id, str(tmp_path), config=str(CONFIG_DIR / f"{algo}.yml")
    )
    hyperparams, _ = manager.read_hyperparameters()
    # Raises ZooInputError unless the variant builds on the environment from this entry.
    kwargs, *_ = manager._preprocess_hyperparams(hyperparams)
    assert kwargs["policy"] == policy
    assert ALGOS[algo] is getattr(sb3_trpo, {"trpo_lstm": "RecurrentTRPO", "trpo_mask": "MaskableTRPO"}[algo])
