"""The speed benchmark's output: one line per measurement, a summary whose ratio is computed from them."""

from __future__ import annotations

import re

import pytest

from sb3_trpo.benchmark.speed import main, run

RUN_LINE = re.compile(
    r"^run (?P<env>\S+) (?P<impl>\S+) rep=(?P<rep>\d+) steps_per_s=(?P<sps>\d+) peak_rss_mb=(?P<rss>\d+) "
    r"rollout_s=(?P<rollout>[\d.]+) policy_step_s=(?P<policy>[\d.]+) critic_s=(?P<critic>[\d.]+|nan) "
    r"total_s=(?P<total>[\d.]+)$"
)


def test_speed_benchmark_reports_both_implementations_and_their_ratio() -> None:
    lines: list[str] = []
    summaries = run(["Pendulum-v1"], steps=2048, repetitions=1, compare="sb3_contrib", seed=0, emit=lines.append)
    runs = [RUN_LINE.match(line) for line in lines[:-1]]
    assert all(runs), lines
    assert [m["impl"] for m in runs if m] == ["sb3_trpo", "sb3_contrib"]
    for match in runs:
        assert match is not None
        phases = float(match["rollout"]) + float(match["policy"]) + (0 if match["critic"] == "nan" else float(match["critic"]))
        assert 0 < phases <= float(match["total"]) + 0.01
        assert int(match["rss"]) > 100
    summary = summaries["Pendulum-v1"]
    assert summary["ratio"] == pytest.approx(summary["sb3_trpo"] / summary["sb3_contrib"])
    assert lines[-1].startswith(f"summary Pendulum-v1 sb3_trpo={summary['sb3_trpo']:.0f} sb3_contrib=")


def test_speed_benchmark_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--repetitions", "0"])
    assert "--repetitions must be >= 1" in capsys.readouterr().err
