"""Compare the per-update diagnostics of two implementations' runs, per phase of training.

For every diagnostic both implementations log (``updates`` of a run file written with
``--record-updates``), each run is reduced to its median over the updates of a phase; the two sets
of per-run medians are then compared with an exact two-sided Wilcoxon rank-sum test (enumeration of
all splits of the pooled midranks, so ties are handled exactly; no scipy needed).

Usage::

    python benchmarks/compare_diagnostics.py benchmark_results/returns_2m_humanoid_n2048_logstd \
        --env Humanoid-v5 --phase-steps 500000 --trajectory-steps 250000
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from sb3_trpo.benchmark.runs import load_results

# The diagnostics compared, with what they mean (both implementations log these under the same name).
DIAGNOSTICS = {
    "train/std": "mean policy std (exp log_std) after the update",
    "train/kl_divergence_loss": "KL of the accepted step (target 0.01)",
    "train/policy_objective": "surrogate after the step (= improvement; advantages normalised)",
    "train/value_loss": "critic MSE",
    "train/explained_variance": "explained variance of the value targets",
    "rollout/ep_rew_mean": "mean training-episode return (outcome, for reference)",
}
ONLY_A = ("train/line_search_backtracks", "train/cg_iterations", "train/cg_residual", "train/entropy")


def midranks(values: list[float]) -> list[float]:
    """Ranks 1..n of ``values``, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_sum_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided rank-sum p of ``a`` against ``b``: share of all splits as extreme as observed."""
    ranks = midranks(a + b)
    n, total = len(a), sum(ranks)
    expected = total * n / len(ranks)
    observed = abs(sum(ranks[:n]) - expected)
    extreme = count = 0
    for chosen in itertools.combinations(ranks, n):
        count += 1
        if abs(sum(chosen) - expected) >= observed - 1e-9:
            extreme += 1
    return extreme / count


def series(run: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """(timesteps, value) of ``key`` over the updates of ``run``."""
    points = []
    for update in run.get("updates") or []:
        if key == "kl_over_target":
            kl = update.get("train/kl_divergence_loss")
            value = (
                None if kl is None else kl / float(update.get("train/target_kl", run["config"]["hyperparams"]["target_kl"]))
            )
        else:
            value = update.get(key)
        if value is not None and math.isfinite(value):
            points.append((float(update["timesteps"]), float(value)))
    return points


def phase_median(run: dict[str, Any], key: str, start: float, end: float, stat: str = "median") -> float | None:
    """The median (or interquartile range, ``stat="iqr"``) of ``key`` over the updates of ``run`` in (start, end]."""
    values = [value for step, value in series(run, key) if start < step <= end]
    if len(values) < 4:
        return statistics.median(values) if values and stat == "median" else None
    if stat == "iqr":
        quartiles = statistics.quantiles(values, n=4)
        return quartiles[2] - quartiles[0]
    return statistics.median(values)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation of ``x`` and ``y`` (midranks)."""
    rx, ry = midranks(x), midranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def takeoff(run: dict[str, Any], threshold: float) -> float:
    """First evaluation step whose mean return reaches ``threshold``; infinity when none does."""
    evaluation = run["evaluation"]
    return next(
        (step for step, mean in zip(evaluation["timesteps"], evaluation["mean"], strict=True) if mean >= threshold), math.inf
    )


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def bins_of(width: float, total: float) -> list[tuple[float, float]]:
    """Consecutive (start, end] bins of ``width`` up to ``total``; the last one also takes the steps past ``total``."""
    bins = []
    start = 0.0
    while start < total:
        bins.append((start, start + width))
        start += width
    bins[-1] = (bins[-1][0], math.inf)
    return bins


def label(start: float, end: float, total: float) -> str:
    return f"{start / 1e3:.0f}-{min(end, total) / 1e3:.0f}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--env", default="Humanoid-v5")
    parser.add_argument("--impl-a", default="sb3_trpo")
    parser.add_argument("--impl-b", default="sb3_contrib")
    parser.add_argument("--phase-steps", type=float, default=500_000, help="width of the phases tested")
    parser.add_argument("--trajectory-steps", type=float, default=250_000, help="width of the trajectory bins")
    parser.add_argument("--total", type=float, default=2_000_000)
    parser.add_argument("--takeoff", type=float, default=2500, help="evaluation return that counts as take-off")
    args = parser.parse_args()

    runs = [run for run in load_results(args.results_dir) if run["env_id"] == args.env and run.get("updates")]
    a = sorted((run for run in runs if run["impl"] == args.impl_a), key=lambda run: run["seed"])
    b = sorted((run for run in runs if run["impl"] == args.impl_b), key=lambda run: run["seed"])
    groups = ((args.impl_a, a), (args.impl_b, b))
    for impl, group in groups:
        finals = [run["evaluation"]["mean"][-1] for run in group]
        print(f"{impl}: seeds {[run['seed'] for run in group]}, final eval {[round(f) for f in finals]}")
    final_p = rank_sum_p([r["evaluation"]["mean"][-1] for r in a], [r["evaluation"]["mean"][-1] for r in b])
    print(f"final eval: exact rank-sum p = {final_p:.3f}")

    phases = bins_of(args.phase_steps, args.total)
    n_tests = n_sig = 0
    for stat, title in (("median", "medians"), ("iqr", "interquartile ranges (update-to-update spread)")):
        print(f"\n## Per-phase {title}: median over runs of each run's {stat} over its updates; exact rank-sum p\n")
        print(f"| diagnostic | phase | {args.impl_a} | {args.impl_b} | p |")
        print("|---|---|---|---|---|")
        for key in DIAGNOSTICS:
            for start, end in phases:
                ma = [m for m in (phase_median(r, key, start, end, stat) for r in a) if m is not None]
                mb = [m for m in (phase_median(r, key, start, end, stat) for r in b) if m is not None]
                if len(ma) < 2 or len(mb) < 2:
                    continue
                p = rank_sum_p(ma, mb)
                if key != "rollout/ep_rew_mean":
                    n_tests += 1
                    n_sig += p < 0.05
                flag = " *" if p < 0.05 else ""
                med_a, med_b = fmt(statistics.median(ma)), fmt(statistics.median(mb))
                print(f"| {key} | {label(start, end, args.total)} | {med_a} | {med_b} | {p:.3f}{flag} |")
    print(
        f"\n{n_sig} of {n_tests} diagnostic tests (rollout/ep_rew_mean left out) at p < 0.05; "
        f"about {0.05 * n_tests:.1f} expected by chance if nothing differed"
    )

    bins = bins_of(args.trajectory_steps, args.total)
    print(f"\n## Trajectories: median over runs of per-run medians, bins of {args.trajectory_steps / 1e3:.0f}k steps\n")
    print("| diagnostic | impl | " + " | ".join(label(s, e, args.total) for s, e in bins) + " |")
    print("|---|---|" + "---|" * len(bins))
    trajectory_keys = ("train/std", "kl_over_target", "train/policy_objective", "train/explained_variance")
    for key in (*trajectory_keys, "train/value_loss", "rollout/ep_rew_mean"):
        for impl, group in groups:
            cells = []
            for start, end in bins:
                meds = [m for m in (phase_median(r, key, start, end) for r in group) if m is not None]
                cells.append(fmt(statistics.median(meds)) if meds else "-")
            print(f"| {key} | {impl} | " + " | ".join(cells) + " |")

    print("\n## Per run\n")
    print("KL/target: median and minimum over all updates (one backtrack multiplies the step by 0.8, so the KL by about 0.64)")
    print(f"backtracks and line-search failures: totals over all updates ({args.impl_b} logs only failures)\n")
    print(
        "| impl | seed | std@500k | std@1M | KL/target med | KL/target min | backtracks | failures "
        f"| take-off (eval >= {args.takeoff:.0f}) | final |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    pooled_std, pooled_final = [], []
    for impl, group in groups:
        for run in group:
            std = series(run, "train/std")
            at = {mark: min(std, key=lambda point: abs(point[0] - mark))[1] for mark in (500_000, 1_000_000)}
            kl = [value for _, value in series(run, "kl_over_target")]
            backtracks = [value for _, value in series(run, "train/line_search_backtracks")]
            failures = sum(1 - value for _, value in series(run, "train/is_line_search_success"))
            bt = f"{sum(backtracks):.0f}" if backtracks else "not logged"
            step = takeoff(run, args.takeoff)
            up = f"{step / 1e3:.0f}k" if math.isfinite(step) else "never"
            final = run["evaluation"]["mean"][-1]
            pooled_std.append(at[1_000_000])
            pooled_final.append(final)
            print(
                f"| {impl} | {run['seed']} | {at[500_000]:.3f} | {at[1_000_000]:.3f} | {statistics.median(kl):.3f} "
                f"| {min(kl):.3f} | {bt} | {failures:.0f} | {up} | {final:.0f} |"
            )
    takeoff_p = rank_sum_p([takeoff(r, args.takeoff) for r in a], [takeoff(r, args.takeoff) for r in b])
    print(f"\ntake-off step (never = tied beyond the end): exact rank-sum p = {takeoff_p:.3f}")
    rho = spearman(pooled_std, pooled_final)
    print(f"Spearman rank correlation of std@1M with the final return, all {len(pooled_std)} runs: {rho:.2f}")

    print(f"\n## {args.impl_a} only (not logged by {args.impl_b}): median over runs of per-run medians per phase\n")
    print("| diagnostic | " + " | ".join(label(s, e, args.total) for s, e in phases) + " |")
    print("|---|" + "---|" * len(phases))
    for key in ONLY_A:
        cells = []
        for start, end in phases:
            meds = [m for m in (phase_median(r, key, start, end) for r in a) if m is not None]
            cells.append(fmt(statistics.median(meds)) if meds else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
