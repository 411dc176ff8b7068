"""Figures people look at in MLflow: the accuracy matrix and per-layer atom activations."""
from __future__ import annotations

import math
import re
import textwrap
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


def activation_heatmap(routing_mass: dict[str, np.ndarray], path: Path, title: str = "",
                       task_atoms: dict[str, list[int]] | None = None, task_names: list[str] | None = None,
                       max_rows: int = 48) -> Path:
    """Per layer (rows, in model order), the share of the layer's routing weight each atom
    (columns) received over a task, like the paper's Fig. 5. Columns come in one block per task
    (``task_atoms[layer]``: that layer's atom count per task, oldest first), separated by lines
    and labelled with ``task_names``; a block is as wide as its widest layer, so a pruned layer
    leaves its block's end blank. With more than ``max_rows`` layers, rows are the layer types
    (``self_attn.q_proj``...), each the mean share over its layers."""
    names = sorted(routing_mass, key=_model_order)
    shares = {name: _shares(routing_mass[name]) for name in names}
    blocks = {name: list((task_atoms or {}).get(name) or [len(shares[name])]) for name in names}
    for name in names:   # atoms past the known blocks (e.g. the open task's) form one more block
        extra = len(shares[name]) - sum(blocks[name])
        if extra > 0:
            blocks[name].append(extra)
    rows, row_names = [(shares[n], blocks[n]) for n in names], names
    if len(names) > max_rows:
        rows, row_names = _by_layer_type(names, shares, blocks)
    count = max(len(b) for _, b in rows) if rows else 1
    widths = [max((b[t] if t < len(b) else 0) for _, b in rows) for t in range(count)]
    grid = np.full((len(rows), max(sum(widths), 1)), np.nan)
    for i, (share, block) in enumerate(rows):
        start = offset = 0
        for t, size in enumerate(block):
            grid[i, offset: offset + size] = share[start: start + size]
            start, offset = start + size, offset + widths[t]
        # later blocks start at their own offsets even when this layer has fewer atoms
    fig_w = min(max(6.0, 2.5 + 0.06 * grid.shape[1]), 24)
    fig, ax = plt.subplots(figsize=(fig_w, min(max(3.0, 1.6 + 0.14 * len(rows)), 30)))
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    edges = np.cumsum(widths)[:-1]
    for edge in edges:
        ax.axvline(edge - 0.5, color="white", linewidth=1.2)
    centres = [e - w / 2 - 0.5 for e, w in zip(np.cumsum(widths), widths)]
    labels = list(task_names or [])[: count] + [f"task {t + 1}" for t in range(len(task_names or []), count)]
    ax.set_xticks(centres, labels, rotation=30 if count > 4 else 0, ha="right" if count > 4 else "center",
                  fontsize=8)
    step = max(1, len(rows) // 40)
    ax.set_yticks(range(0, len(rows), step), [_short_layer(row_names[i]) for i in range(0, len(rows), step)],
                  fontsize=6 if len(rows) > 20 else 8)
    ax.set_xlabel("atoms, one block per task (oldest first)")
    ax.set_title(_wrap(title or "atom activation share per layer", fig_w), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the layer's routing mass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shares(mass) -> np.ndarray:
    mass = np.asarray(mass, dtype=float)
    total = mass.sum()
    return mass / total if total > 0 else np.zeros_like(mass)


# Within one block, the order modules run in (names sort q, k, v, o otherwise as k, o, q, v).
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
                 "c_fc", "c_proj")


def _model_order(name: str) -> tuple:
    """Layers by their indices (``layers.10`` after ``layers.9``), then the order modules run in."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", name))
    module = name.rsplit(".", 1)[-1]
    return numbers, _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER), name


def _layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the part after the last index."""
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else name


def _short_layer(name: str) -> str:
    return name.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def _by_layer_type(names, shares, blocks):
    """One row per layer type: per task block, the mean share over the type's layers (padded)."""
    types: dict[str, list[str]] = {}
    for name in names:
        types.setdefault(_layer_type(name), []).append(name)
    rows = []
    for members in types.values():
        count = max(len(blocks[n]) for n in members)
        widths = [max((blocks[n][t] if t < len(blocks[n]) else 0) for n in members) for t in range(count)]
        padded = np.full((len(members), sum(widths)), np.nan)
        for i, n in enumerate(members):
            start = offset = 0
            for t, size in enumerate(blocks[n]):
                padded[i, offset: offset + size] = shares[n][start: start + size]
                start, offset = start + size, offset + widths[t]
        with np.errstate(all="ignore"):
            rows.append((np.nanmean(padded, axis=0), widths))
    return rows, [f"{t} (mean of {len(m)})" for t, m in types.items()]


def _wrap(title: str, width_inches: float) -> str:
    return "\n".join(textwrap.wrap(title, max(30, int(width_inches * 11))))


def routing_heatmap(matrix: list[list[float]], tasks: list[str], path: Path, title: str = "") -> Path:
    """Who routes to whom: row i = inputs of task i, column j = share of routing mass on task j's atoms."""
    values = np.array(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 + 0.8 * values.shape[1]), max(3.0, 1.5 + 0.6 * values.shape[0])))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    ax.set_xticks(range(values.shape[1]), tasks[: values.shape[1]], rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), [f"{t} inputs" for t in tasks[: values.shape[0]]])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.6 else "black", fontsize=8)
    ax.set_xlabel("atoms of task")
    ax.set_title(_wrap(title or "share of routing mass per task's atoms", ax.figure.get_figwidth()), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_bars(groups: dict[str, dict[str, tuple[float, float | None]]], path: Path, title: str = "") -> Path:
    """One panel per metric, a bar per method: mean with the std as error bar (none for one run)."""
    metrics = sorted({m for values in groups.values() for m in values}, key=["OP", "BWT_eq10", "FWT"].index)
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.6 * max(len(metrics), 1), 3.4), squeeze=False)
    names = list(groups)
    for ax, metric in zip(axes[0], metrics):
        means = [groups[n].get(metric, (np.nan, None))[0] for n in names]
        errors = [groups[n].get(metric, (np.nan, None))[1] or 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
    fig.suptitle(_wrap(title, 3.6 * max(len(metrics), 1)), fontsize=10)
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
