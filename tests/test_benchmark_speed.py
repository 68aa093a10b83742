"""The speed benchmark's output: one line per measurement, a summary whose ratio is computed from them."""

from __future__ import annotations

import multiprocessing
import re

import pytest

from sb3_trpo.benchmark.speed import _private_kb, main, run

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
        # The phases are disjoint parts of the total; each of the four printed figures is rounded to 0.01.
        assert 0 < phases <= float(match["total"]) + 4 * 0.005 + 1e-9
        assert int(match["rss"]) > 100
    summary = summaries["Pendulum-v1"]
    assert summary["ratio"] == pytest.approx(summary["sb3_trpo"] / summary["sb3_contrib"])
    assert lines[-1].startswith(f"summary Pendulum-v1 sb3_trpo={summary['sb3_trpo']:.0f} sb3_contrib=")


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
    assert len(shared) == 64 << 20
    assert sizes[0] < 32, "the 64 MB shared with the parent must not count"
    assert 64 <= sizes[64] < 64 + 32
