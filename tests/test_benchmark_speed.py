"""The speed benchmark's output: one line per measurement, a summary whose ratio is computed from them."""

from __future__ import annotations

import multiprocessing
import re

import pytest

from sb3_trpo.benchmark import speed
from sb3_trpo.benchmark.speed import _private_kb, main, run

RUN_LINE = re.compile(
    r"^run (?P<scenario>\S+) (?P<env>\S+) (?P<impl>\S+) rep=(?P<rep>\d+) steps_per_s=(?P<sps>\d+) peak_rss_mb=(?P<rss>\d+) "
    r"rollout_s=(?P<rollout>[\d.]+) policy_step_s=(?P<policy>[\d.]+) critic_s=(?P<critic>[\d.]+|nan) "
    r"total_s=(?P<total>[\d.]+)$"
)


def test_speed_benchmark_prints_a_line_per_run_and_a_summary_of_them() -> None:
    lines: list[str] = []
    summaries = run(["Pendulum-v1"], steps=2048, repetitions=1, compare="sb3_contrib", seed=0, emit=lines.append)
    runs = [RUN_LINE.match(line) for line in lines[:-1]]
    assert all(runs), lines
    assert [m["impl"] for m in runs if m] == ["sb3_trpo", "sb3_contrib"]
    summary = summaries["Pendulum-v1"]
    for match in runs:
        assert match is not None
        phases = float(match["rollout"]) + float(match["policy"]) + (0 if match["critic"] == "nan" else float(match["critic"]))
        # The phases are disjoint parts of the total; each of the four printed figures is rounded to 0.01.
        assert 0 < phases <= float(match["total"]) + 4 * 0.005 + 1e-9
        assert int(match["rss"]) > 100
        # One repetition: the summary's speed is the measured one (printed rounded to 1 step/s).
        assert summary[match["impl"]] == pytest.approx(float(match["sps"]), abs=0.5)
    assert {m["scenario"] for m in runs if m} == {"default"}
    assert lines[-1].startswith(f"summary default Pendulum-v1 sb3_trpo={summary['sb3_trpo']:.0f} sb3_contrib=")


def test_summary_is_the_median_speed_and_the_median_of_the_per_repetition_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ratios 2, 1.5, 3 (median 2), while the ratio of the median speeds is 240 / 80 = 3.
    speeds = {"sb3_trpo": [100.0, 300.0, 240.0], "sb3_contrib": [50.0, 200.0, 80.0]}
    calls: list[str] = []

    def worker(impl: str, env_id: str, steps: int, seed: int, background_critic: str, scenario: str) -> dict[str, float]:
        repetition = calls.count(impl)
        calls.append(impl)
        timings = dict(rollout_s=1.0, policy_step_s=1.0, critic_s=1.0, total_s=3.0)
        return dict(steps_per_s=speeds[impl][repetition], peak_rss_mb=100.0 + 10 * repetition, **timings)

    monkeypatch.setattr(speed, "_run_worker", worker)
    lines: list[str] = []
    summary = run(["Env-v0"], steps=1, repetitions=3, compare="sb3_contrib", seed=0, emit=lines.append)["Env-v0"]
    # The implementations alternate which runs first.
    assert calls == ["sb3_trpo", "sb3_contrib", "sb3_contrib", "sb3_trpo", "sb3_trpo", "sb3_contrib"]
    assert (summary["sb3_trpo"], summary["sb3_contrib"], summary["ratio"]) == (240.0, 80.0, 2.0)
    assert summary["peak_rss_mb"] == {"sb3_trpo": 120.0, "sb3_contrib": 120.0}
    expected = "summary default Env-v0 sb3_trpo=240 sb3_contrib=80 ratio=2.00 peak_rss_mb sb3_trpo=120 sb3_contrib=120"
    assert lines[-1] == expected


def test_speed_benchmark_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--repetitions", "0"])
    assert "--repetitions must be >= 1" in capsys.readouterr().err


def test_worker_memory_counts_only_its_private_pages() -> None:
    """The background critic worker is charged for what it alone maps, not for what it shares."""
    context = multiprocessing.get_context("fork")
    shared = b"\x01" * (64 << 20)  # resident in this process, shared with a forked child
    ready, done = context.Event(), context.Event()

    def child(private_mb: int) -> None:
        held = b"\x02" * (private_mb << 20)
        ready.set()
        done.wait(30)
        del held

    sizes = {}
    for private_mb in (0, 64):
        ready.clear()
        done.clear()
        process = context.Process(target=child, args=(private_mb,))
        process.start()
        assert ready.wait(30)
        sizes[private_mb] = _private_kb(process.pid) / 1024
        done.set()
        process.join()
    del shared  # held, resident, until both children were measured
    assert sizes[0] < 32, "the 64 MB shared with the parent must not count"
    assert 64 <= sizes[64] < 64 + 32


@pytest.mark.parametrize(
    ("options", "expected"),
    [([], "auto"), (["--background-critic"], "true"), (["--background-critic", "false"], "false")],
)
def test_background_critic_option_reaches_the_run(
    options: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bare flag of earlier commands (BENCHMARKS.md) still means ``background_critic_fit=True``."""
    seen: list[str] = []
    monkeypatch.setattr(speed, "run", lambda *args, **kwargs: seen.append(args[-1]))
    assert main(["--envs", "Env-v0", *options]) == 0
    assert seen == [expected]
    assert f"background_critic_fit={expected} " in capsys.readouterr().out


def test_scenarios_run_in_order_with_their_own_environments_and_steps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str, int]] = []

    def worker(impl: str, env_id: str, steps: int, seed: int, background_critic: str, scenario: str) -> dict[str, float]:
        calls.append((scenario, env_id, steps))
        return dict(steps_per_s=1.0, peak_rss_mb=1.0, rollout_s=0.0, policy_step_s=0.0, critic_s=0.0, total_s=1.0)

    monkeypatch.setattr(speed, "_run_worker", worker)
    assert main(["--scenarios", "callback", "scale", "--repetitions", "1"]) == 0
    expected = [("callback", env, 20_480) for env in ("HalfCheetah-v5", "Hopper-v5")] + [("scale", "Humanoid-v5", 32_768)]
    assert calls[::2] == expected and calls[1::2] == expected
    out = capsys.readouterr().out
    assert "# scenario scale: n_envs=8 policy_kwargs={'net_arch': {'pi': [256, 256], 'vf': [256, 256]}}" in out
    assert "summary callback Hopper-v5 " in out and "summary scale Humanoid-v5 " in out
    calls.clear()
    assert main(["--scenarios", "scale", "--envs", "Env-v0", "--steps", "64", "--repetitions", "1"]) == 0
    assert calls == [("scale", "Env-v0", 64)] * 2


@pytest.mark.parametrize("impl", ["sb3_trpo", "sb3_contrib"])
def test_callback_scenario_trains_with_the_users_callback(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's callback sees each finished episode's return (a Pendulum-v1 episode is 200 steps, 2 environments)."""
    returns: list[float] = []
    scenario = speed.Scenario(envs=("Pendulum-v1",), n_envs=2, steps=0, user_callback=True)
    monkeypatch.setitem(speed.SCENARIOS, "callback", scenario)
    original = speed.EpisodeReturnLogger._on_step

    def on_step(self: speed.EpisodeReturnLogger) -> bool:
        returns.extend(info["episode"]["r"] for info in self.locals["infos"] if "episode" in info)
        return original(self)

    monkeypatch.setattr(speed.EpisodeReturnLogger, "_on_step", on_step)
    monkeypatch.setitem(speed.SETTINGS, "n_steps", 200)
    result = speed.measure(impl, "Pendulum-v1", 800, seed=0, background_critic="false", scenario="callback")
    assert result["steps_per_s"] > 0
    assert len(returns) == 4 and all(r < 0 for r in returns)


def test_the_entry_point_dispatches_to_its_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sb3_trpo.benchmark.__main__ import main as benchmark_main

    assert benchmark_main([]) == 2 and benchmark_main(["returns"]) == 2
    assert "usage: python -m sb3_trpo.benchmark {speed,report}" in capsys.readouterr().err
    monkeypatch.setattr(speed, "main", lambda argv: 7 if argv == ["--steps", "1"] else 0)
    assert benchmark_main(["speed", "--steps", "1"]) == 7
