"""The returns benchmark: run files, resume, locks, collapse accounting and the report."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from benchmarks import returns
from sb3_trpo.benchmark import report, runs
from tests.helpers import REPO, exited

CONFIG = """\
CartPole-v1:
  normalize: true
  n_envs: 2
  n_timesteps: !!float 1e5
  policy: 'MlpPolicy'
  n_steps: 256
  batch_size: 256
  learning_rate: lin_1e-3
  n_critic_updates: 2
  policy_kwargs: "dict(net_arch=[16])"
"""


def _campaign(config: Path, results: Path) -> list[str]:
    return [
        "--envs", "CartPole-v1", "--seeds", "0", "1", "--impl", "sb3_trpo", "--compare", "sb3_contrib",
        "--timesteps", "1000", "--eval-freq", "600", "--eval-episodes", "2",
        "--config", str(config), "--results-dir", str(results), "--jobs", "2",
    ]  # fmt: skip


def _mtimes(results: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in results.glob("*.json.gz")}


def test_campaign_writes_run_files_and_resumes_without_retraining(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, results = tmp_path / "trpo.yml", tmp_path / "results"
    config.write_text(CONFIG)

    assert returns.main(_campaign(config, results)) == 0
    names = sorted(f"CartPole-v1__{impl}__seed{seed}.json.gz" for impl in ("sb3_trpo", "sb3_contrib") for seed in (0, 1))
    assert sorted(path.name for path in results.iterdir()) == names  # no lock or temporary file left
    for name in names:
        record = runs.read_run(results / name)
        impl = name.split("__")[1]
        assert record["complete"] is True
        assert record["impl"] == impl
        expected_class = {"sb3_trpo": "sb3_trpo.trpo.trpo.TRPO", "sb3_contrib": "sb3_contrib.trpo.trpo.TRPO"}[impl]
        assert record["algorithm"] == expected_class
        assert (record["env_id"], record["seed"]) == ("CartPole-v1", int(name.removesuffix(".json.gz")[-1]))
        assert record["config"]["entry"] == "CartPole-v1"
        assert record["config"]["hyperparams"]["learning_rate"] == "lin_1e-3"
        # Two rollouts of 2 envs x 256 steps; an evaluation at step 600 and one on the final policy.
        assert (record["total_timesteps"], record["num_timesteps"]) == (1000, 1024)
        assert record["evaluation"]["timesteps"] == [600, 1024]
        assert len(record["evaluation"]["mean"]) == len(record["evaluation"]["std"]) == 2
        assert all(9 <= value <= 500 for value in record["evaluation"]["mean"])  # CartPole returns
        assert record["line_search"]["n_updates"] == 2
        assert 0 <= record["line_search"]["n_failures"] <= 2
        assert record["steps_per_second"] > 0
        assert record["versions"]["stable_baselines3"] is not None and record["versions"]["torch"] is not None
    capsys.readouterr()

    before = _mtimes(results)
    assert returns.main(_campaign(config, results)) == 0
    assert _mtimes(results) == before
    assert "done: 4, trained: 0" in capsys.readouterr().out

    # Run files made with other settings are kept, with a warning, and not trained again.
    other = [arg if arg != "1000" else "2000" for arg in _campaign(config, results)]
    assert returns.main(other) == 0
    assert _mtimes(results) == before
    assert capsys.readouterr().err.count("timesteps 1000 instead of 2000") == 4
    assert returns.main([*_campaign(config, results), "--record-updates"]) == 0
    assert _mtimes(results) == before
    assert capsys.readouterr().err.count("(updates not recorded)") == 4

    # The same config read from another path, or the same values under another entry name (an
    # older version of the task), is the same setting; a changed entry value is not.
    moved = tmp_path / "elsewhere" / "trpo.yml"
    moved.parent.mkdir()
    moved.write_text(CONFIG)
    assert returns.main(_campaign(moved, results)) == 0
    assert capsys.readouterr().err == ""
    moved.write_text(CONFIG.replace("CartPole-v1:", "CartPole-v0:"))
    assert returns.main(_campaign(moved, results)) == 0
    assert capsys.readouterr().err == ""
    moved.write_text(CONFIG.replace("n_critic_updates: 2", "n_critic_updates: 3"))
    assert returns.main(_campaign(moved, results)) == 0
    assert capsys.readouterr().err.count(f"n_critic_updates 2 instead of 3 in {moved}") == 4
    # An argument left unset has the algorithm's default: writing the default out changes nothing.
    moved.write_text(CONFIG + "  target_kl: 0.01\n")
    assert returns.main(_campaign(moved, results)) == 0
    assert capsys.readouterr().err == ""
    moved.write_text(CONFIG + "  target_kl: 0.02\n")
    assert returns.main(_campaign(moved, results)) == 0
    assert capsys.readouterr().err.count(f"target_kl 0.01 instead of 0.02 in {moved}") == 4
    assert _mtimes(results) == before

    # A run whose file is missing is trained again, in this process; the others are not touched.
    missing = returns.RunSpec("sb3_contrib", "CartPole-v1", 1, 1000, str(config), 600, 2)
    (results / f"{missing.name}.json.gz").unlink()
    assert [returns.execute(spec, results) for spec in (missing, missing)] == ["trained", "done"]
    after = _mtimes(results)
    assert after.keys() == before.keys()
    assert {name: after[name] == before[name] for name in after} == {name: name != f"{missing.name}.json.gz" for name in after}

    # A run kept as plain JSON (a run file of an earlier runner) is done too: nothing is trained.
    kept = results / f"{missing.name}.json.gz"
    kept.with_suffix("").write_text(json.dumps(runs.read_run(kept)))
    kept.unlink()
    assert returns.execute(missing, results) == "done"
    assert returns.main(_campaign(config, results)) == 0
    assert "done: 4, trained: 0" in capsys.readouterr().out


def test_a_dead_worker_process_fails_only_its_run_which_the_next_invocation_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # rl-zoo3 imports an entry's env_wrapper in the worker process, which this one kills at once.
    (tmp_path / "dying_wrapper.py").write_text(
        "import os\nimport signal\n\n\ndef die(env):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned processes inherit sys.path
    config, results = tmp_path / "trpo.yml", tmp_path / "results"
    healthy = CONFIG + CONFIG.replace("CartPole-v1", "Acrobot-v1")
    config.write_text(healthy + "  env_wrapper: dying_wrapper.die\n")
    campaign = [
        "--envs", "Acrobot-v1", "CartPole-v1", "--seeds", "0", "--impl", "sb3_trpo", "--timesteps", "1000",
        "--eval-freq", "600", "--eval-episodes", "2", "--config", str(config), "--results-dir", str(results), "--jobs", "2",
    ]  # fmt: skip
    dead, alive = "Acrobot-v1__sb3_trpo__seed0", "CartPole-v1__sb3_trpo__seed0"

    assert returns.main(campaign) == 1
    captured = capsys.readouterr()
    assert "done: 0, trained: 1, locked: 0, failed: 1" in captured.out and f"  failed: {dead}" in captured.out
    assert f"[{dead}] failed: its process died (killed by SIGKILL)" in captured.err
    # The run beside it finished; the dead run left its lock, stale now that its process is gone.
    assert returns.is_complete(results / f"{alive}.json.gz")
    assert sorted(path.name for path in results.iterdir()) == [f"{dead}.json.lock", f"{alive}.json.gz"]

    config.write_text(healthy)
    assert returns.main(campaign) == 0
    assert "done: 1, trained: 1, locked: 0, failed: 0" in capsys.readouterr().out
    assert returns.is_complete(results / f"{dead}.json.gz")
    assert sorted(path.name for path in results.iterdir()) == [f"{dead}.json.gz", f"{alive}.json.gz"]


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "Ctrl-C"])
def test_a_killed_campaign_takes_its_training_worker_with_it(tmp_path: Path, signal_name: str) -> None:
    config, results = tmp_path / "trpo.yml", tmp_path / "results"
    config.write_text(CONFIG)
    campaign = [
        sys.executable, "-m", "benchmarks.returns", "--envs", "CartPole-v1", "--seeds", "0",
        "--impl", "sb3_trpo", "--timesteps", "10000000", "--config", str(config), "--results-dir", str(results),
    ]  # fmt: skip
    # Its own process group, with SIGINT's default disposition, as a terminal starts it.
    runner = subprocess.Popen(
        campaign,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lock = results / "CartPole-v1__sb3_trpo__seed0.json.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = json.loads(lock.read_text())["pid"]  # the run's lock names the process training it
        assert worker != runner.pid and Path(f"/proc/{worker}").exists()
    finally:
        if signal_name == "Ctrl-C":  # a terminal sends it to the whole process group
            os.killpg(runner.pid, signal.SIGINT)
        else:
            runner.send_signal(getattr(signal, signal_name))
        runner.wait(timeout=30)
    assert exited(worker, timeout=10)


@pytest.mark.parametrize("impl", ["sb3_trpo", "sb3_contrib"])
def test_record_updates_keeps_each_updates_logged_statistics(tmp_path: Path, impl: str) -> None:
    config = tmp_path / "trpo.yml"
    config.write_text(CONFIG)
    spec = returns.RunSpec(impl, "CartPole-v1", 0, 1500, str(config), 600, 2, record_updates=True)
    record = returns.train_and_evaluate(spec)

    updates = record["updates"]
    # Three rollouts of 2 envs x 256 steps, one update after each.
    assert [update["timesteps"] for update in updates] == [512, 1024, 1536]
    assert record["line_search"]["n_updates"] == len(updates)
    successes = [update["train/is_line_search_success"] for update in updates]
    assert record["line_search"]["n_failures"] == successes.count(0.0)
    for update in updates:
        assert {"train/policy_objective", "train/value_loss", "train/kl_divergence_loss"} <= update.keys()
        assert 0.0 <= update["train/kl_divergence_loss"] <= 0.01 * 1.5  # delta and the search's slack
        # CartPole pays 1 per step: a mean episode return is an episode length.
        assert update["rollout/ep_rew_mean"] is None or 8 <= update["rollout/ep_rew_mean"] <= 500
    assert updates[-1]["rollout/ep_rew_mean"] is not None

    assert "updates" not in returns.train_and_evaluate(dataclasses.replace(spec, record_updates=False))


def test_target_kl_schedule_runs_as_a_schedule_and_sb3_contrib_at_its_start(tmp_path: Path) -> None:
    config = tmp_path / "trpo.yml"
    config.write_text(CONFIG + "  target_kl: lin_0.02\n")
    spec = returns.RunSpec("sb3_trpo", "CartPole-v1", 0, 1500, str(config), 600, 2, record_updates=True)
    ours = returns.train_and_evaluate(spec)
    # From 0.02 to a tenth of it over the 1,500 steps, read after each rollout of 512 steps.
    expected = [0.002 + 0.018 * max(1 - steps / 1500, 0.0) for steps in (512, 1024, 1536)]
    assert [update["train/target_kl"] for update in ours["updates"]] == pytest.approx(expected)
    assert ours["config"]["constant_for_impl"] == {}
    assert ours["config"]["hyperparams"]["target_kl"] == "lin_0.02"

    contrib = returns.train_and_evaluate(dataclasses.replace(spec, impl="sb3_contrib"))
    assert contrib["config"]["constant_for_impl"] == {"target_kl": 0.02}
    # Its last step is measured against the start value, not the schedule's end (0.002).
    kls = [update["train/kl_divergence_loss"] for update in contrib["updates"]]
    assert kls[-1] > 0.002 * 1.5 and max(kls) <= 0.02 * 1.5


def test_constant_target_kl_is_passed_unchanged() -> None:
    for impl in ("sb3_trpo", "sb3_contrib"):
        kwargs = {"target_kl": 0.03, "n_steps": 8}
        assert returns.trust_region_radius(impl, kwargs) == {} and kwargs == {"target_kl": 0.03, "n_steps": 8}
    kwargs = {"n_steps": 8}
    assert returns.trust_region_radius("sb3_contrib", kwargs) == {} and kwargs == {"n_steps": 8}


def _lock(path: Path, host: str, pid: int) -> str:
    content = json.dumps({"host": host, "pid": pid, "since": 0.0})
    path.write_text(content)
    return content


def test_lock_is_exclusive(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    assert returns.try_lock(lock)
    assert not returns.try_lock(lock)


def test_lock_of_live_process_or_other_host_is_respected(tmp_path: Path) -> None:
    live, remote = tmp_path / "live.lock", tmp_path / "remote.lock"
    live_content = _lock(live, socket.gethostname(), 1)  # pid 1 always exists
    remote_content = _lock(remote, "another-host", 2**22 + 12345)
    assert not returns.try_lock(live)
    assert not returns.try_lock(remote)
    assert (live.read_text(), remote.read_text()) == (live_content, remote_content)


def test_lock_of_dead_process_is_reclaimed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "run.lock"
    _lock(lock, socket.gethostname(), int(finished.stdout))
    assert returns.try_lock(lock)
    assert json.loads(lock.read_text())["pid"] != int(finished.stdout)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.lock"]


def test_locked_run_is_skipped_and_failed_run_releases_its_lock(tmp_path: Path) -> None:
    config = tmp_path / "trpo.yml"
    config.write_text("default:\n  policy: 'MlpPolicy'\n  n_timesteps: 1000\n")
    spec = returns.RunSpec("sb3_trpo", "NoSuchEnv-v0", 0, 1000, str(config), 500, 1)
    lock = tmp_path / f"{spec.name}.json.lock"
    _lock(lock, socket.gethostname(), 1)
    assert returns.execute(spec, tmp_path) == "locked"
    lock.unlink()
    with pytest.raises(Exception, match="NoSuchEnv"):
        returns.execute(spec, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trpo.yml"]


def test_config_entry_falls_back_to_older_version_then_default() -> None:
    table = {"Hopper-v2": {}, "Hopper-v3": {}, "Hopper-v6": {}, "default": {}}
    assert returns.entry_for_env(table, "Hopper-v3") == "Hopper-v3"
    assert returns.entry_for_env(table, "Hopper-v5") == "Hopper-v3"
    assert returns.entry_for_env(table, "Walker2d-v5") == "default"
    with pytest.raises(KeyError, match="Walker2d-v5"):
        returns.entry_for_env({"Hopper-v4": {}}, "Walker2d-v5")
    assert returns.default_config().name == "trpo.yml" and returns.default_config().is_file()


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([100, 200, 150, 139, 141, 300, 100], 2),  # below 0.7 x best: 139 (best 200), 100 (best 300)
        ([-100, -120, -131, -50, -66, -64], 2),  # below 1.3 x best: -131 (best -100), -66 (best -50)
        ([0, -1, 0, 5, 3.6, 3.4], 2),  # from a best of 0 any loss counts: -1; 3.4 < 3.5
        ([-5], 0),
        ([], 0),
        ([10, 1, 1, 1], 3),  # every evaluation below the threshold counts, not only the first
    ],
)
def test_collapse_count(curve: list[float], expected: int) -> None:
    assert report.collapse_count(curve) == expected


def _record(impl: str, seed: int, means: list[float], failures: int, updates: int, speed: float) -> dict:
    return {
        "format": 1,
        "complete": True,
        "impl": impl,
        "env_id": "Fake-v0",
        "seed": seed,
        "total_timesteps": 1000 * len(means),
        "num_timesteps": 1000 * len(means),
        "config": {"entry": "Fake-v0"},
        "evaluation": {
            "freq": 1000,
            "episodes": 10,
            "timesteps": [1000 * (i + 1) for i in range(len(means))],
            "mean": means,
            "std": [1.0] * len(means),
        },
        "line_search": {"n_updates": updates, "n_failures": failures},
        "wall_time_s": 60.0,
        "steps_per_second": speed,
        "versions": {"torch": "2.13.0"},
    }


def _write_synthetic(results: Path) -> None:
    results.mkdir()
    records = [
        _record("sb3_contrib", 0, [-50, -100], 0, 5, 50.0),
        _record("sb3_contrib", 1, [-40, -30], 0, 5, 70.0),
        _record("sb3_trpo", 0, [5, 12, 10], 1, 10, 100.0),
        _record("sb3_trpo", 1, [20, 2, 20], 0, 10, 200.0),
        _record("sb3_trpo", 2, [30, 36, 30], 2, 10, 300.0),
    ]
    for record in records:
        (results / f"Fake-v0__{record['impl']}__seed{record['seed']}.json").write_text(json.dumps(record))
    (results / ".Fake-v0__sb3_trpo__seed3.json.123.tmp").write_text("{")
    (results / "Fake-v0__sb3_trpo__seed4.json.lock").write_text("{}")
    (results / "Fake-v0__sb3_trpo__seed5.json").write_text(json.dumps({**records[0], "complete": False}))


def test_report_table_on_synthetic_runs(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_synthetic(results)
    groups = report.group(runs.load_results(results))
    assert list(groups) == [("Fake-v0", "sb3_trpo"), ("Fake-v0", "sb3_contrib")]
    trpo, contrib = (report.summarize(env, impl, runs) for (env, impl), runs in groups.items())
    assert trpo.n_seeds == 3 and contrib.n_seeds == 2
    assert trpo.final_mean == 20.0 and trpo.final_std == pytest.approx(math.sqrt(200 / 3))
    assert trpo.best_mean == pytest.approx(68 / 3) and trpo.best_std == pytest.approx(math.sqrt(896 / 9))
    assert (trpo.collapses, trpo.evaluations) == (1, 9)
    assert trpo.failure_fraction == pytest.approx(0.1)
    assert (contrib.final_mean, contrib.final_std, contrib.best_mean, contrib.best_std) == (-65.0, 35.0, -40.0, 10.0)
    assert (contrib.collapses, contrib.evaluations, contrib.failure_fraction) == (1, 4, 0.0)
    assert trpo.stability == pytest.approx(20 / (68 / 3)) and contrib.stability is None  # negative best: no ratio
    assert report.markdown_table([trpo, contrib]).splitlines()[2:] == [
        "| Fake-v0 | sb3_trpo | 3 | 3k | 20.0 ± 8.2 | 22.7 ± 10.0 | 88.2% | 1 / 9 | 10.0% (3/30) | 200 |",
        "| Fake-v0 | sb3_contrib | 2 | 2k | -65.0 ± 35.0 | -40.0 ± 10.0 | n/a | 1 / 4 | 0.0% (0/10) | 60 |",
    ]


@pytest.mark.parametrize(
    ("final", "best", "expected"),
    [(2669.1, 3510.1, 2669.1 / 3510.1), (50.0, 50.0, 1.0), (-65.0, -40.0, None), (-1.0, 0.0, None)],
)
def test_stability_ratio_is_final_over_best_for_a_positive_best(final: float, best: float, expected: float | None) -> None:
    assert report.stability_ratio(final, best) == (None if expected is None else pytest.approx(expected))


def test_report_writes_markdown_and_plot(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_synthetic(results)
    output, plot = tmp_path / "out" / "REPORT.md", tmp_path / "out" / "returns.png"
    assert report.main(["--results-dir", str(results), "--output", str(output), "--plot", str(plot)]) == 0
    text = output.read_text()
    assert "| Fake-v0 | sb3_trpo | 3 | 3k | 20.0 ± 8.2 | 22.7 ± 10.0 | 88.2% | 1 / 9 | 10.0% (3/30) | 200 |" in text
    assert "![learning curves](returns.png)" in text
    assert text.count("| Fake-v0 | sb3_trpo | ") == 4  # the summary row and one row per seed
    # One panel: a 5 x 3.6 inch figure at 110 dpi.
    assert image.imread(plot).shape == (396, 550, 4)
    assert report.main(["--results-dir", str(tmp_path / "empty")]) == 1


def test_a_run_set_includes_the_run_files_its_runs_txt_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    _write_synthetic(results)

    def table(records: list[dict]) -> str:
        return report.markdown_table([report.summarize(*key, group) for key, group in report.group(records).items()])

    before = table(runs.load_results(results))
    # Two runs kept elsewhere, one of them compressed, and one there that the pattern leaves out.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (results / "Fake-v0__sb3_trpo__seed1.json").rename(elsewhere / "Fake-v0__sb3_trpo__seed1.json")
    moved = results / "Fake-v0__sb3_trpo__seed2.json"
    (elsewhere / "Fake-v0__sb3_trpo__seed2.json.gz").write_bytes(gzip.compress(moved.read_bytes()))
    moved.unlink()
    (elsewhere / "Other-v0__sb3_trpo__seed0.json").write_text(json.dumps({**_record("sb3_trpo", 0, [1.0], 0, 1, 1.0)}))
    (results / "runs.txt").write_text("# kept in another folder\n\n../elsewhere/Fake-v0__*  # seeds 1 and 2\n")

    records = runs.load_results(results)
    assert [(record["impl"], record["seed"]) for record in records if record["env_id"] != "Fake-v0"] == []
    assert table(records) == before
    output = tmp_path / "REPORT.md"
    assert report.main(["--results-dir", str(results), "--output", str(output)]) == 0
    assert f"from 5 run files in `{results}` and where its runs.txt points by" in output.read_text()

    # The same run twice in a set, and a pattern that names nothing, are errors.
    (results / "Fake-v0__sb3_trpo__seed2.json").write_text("{}")
    with pytest.raises(ValueError, match=r"two files of the run Fake-v0__sb3_trpo__seed2\.json"):
        runs.run_files(results)
    (results / "Fake-v0__sb3_trpo__seed2.json").unlink()
    (results / "runs.txt").write_text("../elsewhere/Fake-v1__*\n")
    assert report.main(["--results-dir", str(results)]) == 1
    assert "runs.txt: '../elsewhere/Fake-v1__*' names no run file" in capsys.readouterr().err


def test_user_report_takes_sb3_trpo_from_one_run_set_and_sb3_contrib_from_the_other(tmp_path: Path) -> None:
    def run(impl: str, seed: int, means: list[int]) -> dict:
        return {**_record(impl, seed, means, 0, 1, 1.0), "env_id": "Hopper-v5", "total_timesteps": 1_000_000}

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    # Each set holds runs of the other implementation too, which the comparison leaves out.
    for folder, records in (
        (ours, [run("sb3_trpo", 0, [0, 4000, 3000]), run("sb3_trpo", 1, [0, 3800]), run("sb3_contrib", 0, [9999])]),
        (theirs, [run("sb3_contrib", 0, [0, 2500, 2000]), run("sb3_contrib", 1, [0, 3000]), run("sb3_trpo", 0, [-9999])]),
    ):
        folder.mkdir()
        for record in records:
            (folder / f"Hopper-v5__{record['impl']}__seed{record['seed']}.json").write_text(json.dumps(record))
    output = tmp_path / "REPORT.md"
    assert report.main(["--user", str(ours), str(theirs), "--output", str(output)]) == 0
    text = output.read_text()
    # As in the targets table's test: final/best 3400 / 3900 and 2500 / 2750, the difference in [+0, +1800].
    assert "| Hopper-v5 | 1M | 0, 1 | 3400.0 ± 400.0 | 87.2% | 2500.0 ± 500.0 | 90.9% | +900.0 [+0.0, +1800.0] |" in text
    assert "| Humanoid-v5 | 2M | none | not run | | not run | | |" in text
    assert "9999" not in text and "## Targets" not in text
    assert f"from 4 run files (sb3_trpo's of `{ours}`, sb3-contrib's of `{theirs}`) by" in text


@pytest.mark.slow
def test_step_parity_script_finds_one_update_of_each_implementation_equal_from_a_trained_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/step_parity.py`` (Humanoid-v5 in BENCHMARKS.md) runs against the current code, on Pendulum-v1."""
    from benchmarks import step_parity

    monkeypatch.setattr(step_parity, "ENV_ID", "Pendulum-v1")
    monkeypatch.setattr(step_parity, "MARKS", (1024,))
    monkeypatch.setitem(step_parity.SETTINGS, "n_steps", 256)
    step_parity.train(str(tmp_path))
    errors = step_parity.check(str(tmp_path), "1024")
    assert set(errors) == {"sb3-contrib, CG from zero", "sb3_trpo, analytic", "sb3_trpo, double_backprop"}
    # Every critic fit is bitwise sb3-contrib's; the actor steps differ by rounding and, for
    # sb3-contrib from zero, by its conjugate gradient's random start, which the script does change.
    assert all(critic == 0.0 for _, critic in errors.values())
    assert all(0.0 < actor < 1e-3 for actor, _ in errors.values())


RESULTS = REPO / "benchmark_results"
needs_results = pytest.mark.skipif(not RESULTS.is_dir(), reason="the repository's results are not in the sdist")


@needs_results
def test_each_result_file_of_the_repository_is_stored_once() -> None:
    stored: dict[str, Path] = {}
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest not in stored, f"{path} is a copy of {stored[digest]}: list it in a runs.txt instead"
            stored[digest] = path


@needs_results
def test_the_packaged_entries_run_set_holds_runs_of_the_packaged_entries() -> None:
    for manifest in RESULTS.rglob(runs.MANIFEST):  # every run set of the repository loads
        assert runs.run_files(manifest.parent)
    entries = runs.run_files(RESULTS / "entries_1m")
    envs = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5", "Humanoid-v5")
    expected = {(env, impl, seed) for env in envs for impl in ("sb3_trpo", "sb3_contrib") for seed in range(5)}
    records = {path: runs.read_run(path) for path in entries}
    assert {(record["env_id"], record["impl"], record["seed"]) for record in records.values()} == expected
    for path, record in records.items():
        spec = returns.RunSpec(
            record["impl"], record["env_id"], record["seed"], None, str(returns.default_config()), 50_000, 10
        )
        assert returns.settings_difference(path, spec) == "", path


@needs_results
def test_the_user_comparison_runs_sb3_contrib_with_rl_zoo3s_own_entries() -> None:
    """``benchmark_results/user_1m`` compares the packaged entries with these (rl-zoo3's v4 entries on v5 tasks)."""
    import rl_zoo3

    config = Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml"
    theirs = [path for path in runs.run_files(RESULTS / "returns_1m") if "__sb3_contrib__" in path.name]
    assert len(theirs) == 30
    for path in theirs:
        record = runs.read_run(path)
        spec = returns.RunSpec("sb3_contrib", record["env_id"], record["seed"], None, str(config), 50_000, 10)
        assert returns.settings_difference(path, spec) == "", path


def test_targets_table_compares_common_seeds_at_the_budget() -> None:
    def run(impl: str, seed: int, final: float, best: float | None = None, steps: int = 1_000_000) -> dict:
        means = [0.0, final] if best is None else [0.0, best, final]
        return {**_record(impl, seed, means, 0, 1, 1.0), "env_id": "Hopper-v5", "total_timesteps": steps}

    records = [
        run("sb3_trpo", 0, 3000.0, best=4000.0),
        run("sb3_trpo", 1, 3800.0),
        run("sb3_trpo", 2, 100.0, best=9000.0),  # no sb3-contrib run with seed 2: left out
        run("sb3_trpo", 3, 5000.0, steps=300_000),  # another budget: left out
        run("sb3_contrib", 0, 2000.0, best=2500.0),
        run("sb3_contrib", 1, 3000.0),
        run("sb3_contrib", 3, 0.0, steps=300_000),
        {**run("sb3_trpo", 0, 4600.0, best=5000.0), "env_id": "Walker2d-v5"},
        {**run("sb3_contrib", 0, 4000.0), "env_id": "Walker2d-v5"},
    ]
    rows = report.targets_table(report.group(records)).splitlines()
    assert len(rows) == 2 + len(report.TARGETS)
    # Resampled means: 3400 +- 400 or 3400, against 2500 +- 500 or 2500; their differences span [+0, +1800].
    # final/best over seeds 0-1: 2500 / 2750 (sb3-contrib), 3400 / 3900 (sb3_trpo).
    assert (
        "| Hopper-v5 | 1M | 0, 1 | 2500.0 ± 500.0 | 3400.0 ± 400.0 | yes | +900.0 [+0.0, +1800.0] | 3700 | no "
        "| 90.9% | 87.2% | no |"
    ) in rows
    # 4600 / 5000 is stable (at least 90%).
    assert (
        "| Walker2d-v5 | 1M | 0 | 4000.0 ± 0.0 | 4600.0 ± 0.0 | yes | +600.0 [+600.0, +600.0] | 5000 | no "
        "| 100.0% | 92.0% | yes |"
    ) in rows
    assert "| Humanoid-v5 | 2M | none | not run | not run | | | 3000 | | | | |" in rows


def test_difference_interval_matches_the_normal_interval_on_large_samples() -> None:
    rng = np.random.default_rng(1)
    ours, floor = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 2.0, 400)
    standard_error = math.sqrt(ours.var() / 400 + floor.var() / 400)
    center = ours.mean() - floor.mean()
    low, high = report.difference_interval(ours, floor)
    assert low == pytest.approx(center - 1.96 * standard_error, abs=0.15 * standard_error)
    assert high == pytest.approx(center + 1.96 * standard_error, abs=0.15 * standard_error)


def test_difference_interval_of_constant_samples_is_the_difference() -> None:
    assert report.difference_interval(np.full(3, 5.0), np.full(4, 2.0)) == (3.0, 3.0)
    # Widening the confidence widens the interval; a separated pair excludes zero.
    ours, floor = np.array([10.0, 11.0, 12.0]), np.array([0.0, 1.0, 2.0])
    narrow, wide = report.difference_interval(ours, floor, 0.5), report.difference_interval(ours, floor, 0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1] and wide[0] > 0
