"""Figures people look at in MLflow: the accuracy matrix and per-layer atom activations."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(matrix: list[list[float | None]], tasks: list[str], path: Path, title: str = "") -> Path:
    """R[i][j] = score on task j after training task i (rows: after task, columns: evaluated on)."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 + 0.8 * len(tasks)), max(3.0, 1.5 + 0.6 * len(matrix))))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {t}" for t in tasks[: len(matrix)]])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_title(title or "accuracy matrix R[i][j]")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def activation_heatmap(routing_mass: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Per layer (rows), the share of routing weight each atom (columns) received over a task,
    like the paper's Fig. 5. Layers with fewer atoms (pruned) are padded blank."""
    names = list(routing_mass)
    width = max((len(v) for v in routing_mass.values()), default=0)
    grid = np.full((len(names), max(width, 1)), np.nan)
    for i, name in enumerate(names):
        mass = np.asarray(routing_mass[name], dtype=float)
        total = mass.sum()
        if len(mass):
            grid[i, : len(mass)] = mass / total if total > 0 else 0.0
    fig, ax = plt.subplots(figsize=(min(2 + 0.08 * width, 24), min(1.5 + 0.12 * len(names), 30)))
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], fontsize=5)
    ax.set_xlabel("atom (older tasks first)")
    ax.set_title(title or "atom activation share per layer")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the layer's routing mass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def objective_scatter(rows: list[dict], params: list[str], objective: str, path: Path) -> Path:
    """One panel per hyperparameter: its value against the objective, a dot per trial."""
    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(4 * max(len(params), 1), 3.2), squeeze=False)
    for ax, name in zip(axes[0], params):
        xs = [row[name] for row in rows if name in row and row.get(objective) is not None]
        ys = [row[objective] for row in rows if name in row and row.get(objective) is not None]
        ax.scatter(xs, ys)
        if xs and all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(objective)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
