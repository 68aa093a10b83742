"""Learning curves of the returns benchmark: mean and spread over seeds, one panel per environment."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mean_curve(runs: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timesteps, mean and std over runs of the evaluation curves (interpolated where the grids differ)."""
    grids = [np.asarray(run["evaluation"]["timesteps"], dtype=float) for run in runs]
    curves = [np.asarray(run["evaluation"]["mean"], dtype=float) for run in runs]
    if all(len(grid) == len(grids[0]) and np.array_equal(grid, grids[0]) for grid in grids):
        grid = grids[0]
        stacked = np.stack(curves)
    else:
        start, stop = max(g[0] for g in grids), min(g[-1] for g in grids)
        grid = np.unique(np.concatenate(grids))
        grid = grid[(grid >= start) & (grid <= stop)]
        stacked = np.stack([np.interp(grid, g, c) for g, c in zip(grids, curves, strict=True)])
    return grid, stacked.mean(axis=0), stacked.std(axis=0)


def plot_curves(groups: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    """One panel per environment, every implementation in it: mean over seeds and a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(env for env, _ in groups))
    colors = {impl: f"C{index}" for index, impl in enumerate(dict.fromkeys(impl for _, impl in groups))}
    columns = min(len(envs), 3)
    rows = -(-len(envs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, env_id in zip(axes.flat, envs, strict=False):
        for (env, impl), runs in groups.items():
            if env != env_id:
                continue
            grid, mean, std = mean_curve(runs)
            axis.plot(grid, mean, color=colors[impl], label=f"{impl} (n={len(runs)})")
            axis.fill_between(grid, mean - std, mean + std, color=colors[impl], alpha=0.2)
        axis.set_title(env_id)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("evaluation return")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    for axis in list(axes.flat)[len(envs) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
