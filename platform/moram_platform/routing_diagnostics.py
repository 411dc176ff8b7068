"""Who routes to whom: for each task's evaluation inputs, the share of routing mass (Σ_tokens w
over every layer of a group) that lands on each task's atoms.

    blocks = task_blocks(shards)                       # layer -> atoms per task, as loaded
    with model.collect_activation_stats(): ...         # an evaluation pass over task i's inputs
    row = routing_row(model.activation_stats(), blocks)   # {"all": [share on task 0, 1, ...], "q_proj": ...}

Stacking the rows of tasks 0..T-1 gives a T x T matrix per version (rows: whose inputs,
columns: whose atoms); its diagonal is each task's own-task routing share. A method that learned
task-specific keys shows a matrix near the identity. Only methods with routing weights have one
(MoRAM, MoE-LoRA); for the LoRA baselines every atom takes weight 1, so the share would only
count atoms. Built on MoRAMModel's public API only (collect_activation_stats, activation_stats,
set_activation_stats) and the shards' atom counts.

Evaluation generates answers through the wrapped model's ``generate``, which MoRAMModel does not
mask, so the mass includes left-padding positions of a batch's shorter prompts (a few tokens
next to hundreds; the evaluation batches are the same for every method).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

ALL = "all"


def routes(method) -> bool:
    """Whether a method has routing weights (the strategy's ``routes`` flag)."""
    return type(method).routes


def task_blocks(shards: Sequence[Any], prune_mass: float | None = None) -> dict[str, list[int]] | None:
    """layer -> number of atoms each task holds in the loaded bank (oldest first), or None where
    tasks do not own atoms (SeqLoRA's shards replace the bank)."""
    from moram import METHODS, read_shard
    from moram.functional import atoms_to_keep

    parsed = [s if hasattr(s, "layer_names") else read_shard(s) for s in shards]
    if not parsed or any(shard.mode != "append" for shard in parsed):
        return None
    blocks: dict[str, list[int]] = {}
    for shard in parsed:
        prunes = prune_mass is not None and METHODS[shard.metadata["method"]].prunes
        for name, count in shard.atom_counts.items():
            if prunes:
                count = len(atoms_to_keep(shard.layer(name)["mass"].float(), prune_mass))
            blocks.setdefault(name, []).append(int(count))
    return blocks


def training_blocks(shards: Sequence[Any]) -> dict[str, list[int]] | None:
    """layer -> atoms per task as the last shard's task saw them while it trained (its routing
    mass covers them): the older tasks' kept atoms, then the task's own before pruning."""
    from moram import read_shard

    parsed = [s if hasattr(s, "layer_names") else read_shard(s) for s in shards]
    older = task_blocks(parsed[:-1]) if len(parsed) > 1 else {}
    if not parsed or older is None or parsed[-1].mode != "append":
        return None
    added = parsed[-1].metadata.get("added", {})
    return {name: [*older.get(name, []), int(added.get(name, count))]
            for name, count in parsed[-1].atom_counts.items()}


def training_shares(shards: Sequence[Any]) -> dict[str, list[float]] | None:
    """While the last shard's task trained: per layer group (and ``all``), the share of routing
    mass (its ``routing_mass``: Σ over training tokens of w) on each block it routed over, the
    older tasks' first and its own last. Beside r / R it says whether the new block got its
    share of the mixture while it learned; None for methods without routing weights or without
    task blocks."""
    from moram import METHODS, read_shard

    parsed = [s if hasattr(s, "layer_names") else read_shard(s) for s in shards]
    blocks = training_blocks(parsed) if parsed else None
    if blocks is None or not METHODS[parsed[-1].metadata["method"]].routes:
        return None
    last = parsed[-1]
    return routing_row({name: last.layer(name)["routing_mass"] for name in last.layer_names}, blocks)


def block_norms(shards: Sequence[Any]) -> dict[str, dict[str, list[float]]] | None:
    """Per layer group (and ``all``), each task block's mean key norm ||a_i|| (a row of A) and
    mean value norm ||b_i|| (a column of B, as frozen: alpha/r baked in unless frozen_scale is
    official), oldest task first; None where tasks do not own atoms. A block whose keys are
    smaller answers every input more weakly (Eq. 3) and so wins top-k less often: the scale
    side of the routing share (docs/results.md compares a fresh block's kaiming init with it)."""
    from moram import read_shard

    parsed = [s if hasattr(s, "layer_names") else read_shard(s) for s in shards]
    if not parsed or any(shard.mode != "append" for shard in parsed):
        return None
    sums: dict[str, dict[str, list[list[float]]]] = {}
    for task, shard in enumerate(parsed):
        for name in shard.layer_names:
            tensors = shard.layer(name)
            keys, values = tensors["A"].float().norm(dim=1), tensors["B"].float().norm(dim=0)
            for group in (layer_group(name), ALL):
                entry = sums.setdefault(group, {"keys": [], "values": []})
                for kind, norms in (("keys", keys), ("values", values)):
                    while len(entry[kind]) <= task:
                        entry[kind].append([])
                    entry[kind][task].extend(norms.tolist())
    return {group: {kind: [sum(v) / len(v) if v else float("nan") for v in per_task] for kind, per_task in entry.items()}
            for group, entry in sums.items()}


def layer_group(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: the module's own name."""
    return name.rsplit(".", 1)[-1]


def routing_row(mass: dict[str, torch.Tensor], blocks: dict[str, list[int]]) -> dict[str, list[float]]:
    """Per layer group (and ``all``), the share of the summed routing mass on each task's atoms;
    where the model routed atoms past the tasks' blocks (the untrained block that
    ``route_untrained`` routes at evaluation, MoRAMModel.open_untrained_block), one more column,
    their share."""
    tasks = max(len(b) for b in blocks.values())
    untrained = any(mass.get(name, torch.zeros(0)).numel() > sum(counts) for name, counts in blocks.items())
    totals: dict[str, torch.Tensor] = {}
    for name, counts in blocks.items():
        layer_mass = mass.get(name, torch.zeros(0)).float()
        per_task = torch.zeros(tasks + untrained)
        start = 0
        for t, count in enumerate(counts):
            per_task[t] = layer_mass[start: start + count].sum()
            start += count
        if untrained:
            per_task[tasks] = layer_mass[start:].sum()
        for group in (layer_group(name), ALL):
            totals[group] = totals.get(group, torch.zeros(tasks + untrained)) + per_task
    return {group: (total / total.sum() if total.sum() > 0 else total).tolist() for group, total in totals.items()}


def evaluate_with_routing(model, blocks: dict[str, list[int]] | None, evaluate_task, tasks: Sequence[str]):
    """{task: evaluate_task(task)}, each with its routing row added under "routing" when the
    model routes and its bank's task blocks are known."""
    if blocks is None or not routes(model.method) or sum(map(sum, blocks.values())) != sum(model.atom_counts().values()):
        return {task: evaluate_task(task) for task in tasks}
    empty = {name: torch.zeros(0) for name in model.moram_layers}
    results = {}
    for task in tasks:
        model.set_activation_stats(empty)           # this task's inputs only
        with model.collect_activation_stats():
            result = evaluate_task(task)
        results[task] = {**result, "routing": routing_row(model.activation_stats(), blocks)}
    model.set_activation_stats(empty)
    return results


def routing_matrix(scores: dict[str, dict[str, Any]], tasks: Sequence[str], group: str = ALL) -> list[list[float]] | None:
    """Rows of ``tasks`` (whose inputs) x the version's task blocks (whose atoms), from an
    evaluation record's scores; None if the record has no routing."""
    rows = [scores.get(task, {}).get("routing", {}).get(group) for task in tasks]
    return None if any(row is None for row in rows) else [list(map(float, row)) for row in rows]


def own_shares(matrix: list[list[float]], trained: int) -> list[float]:
    """The diagonal over the trained tasks: how much of task i's routing stays on task i's atoms."""
    return [matrix[i][i] for i in range(min(trained, len(matrix)))]


# -- MLflow: metrics and heatmaps on a sequence's run ---------------------------------------------
def log_sequence_routing(config, tracker, run_id: str) -> dict[str, float]:
    """For every version of the sequence with routing in its evaluation record: the T x T matrix
    (trained tasks' inputs x their atoms) as CSV and heatmap, and the own-task share per task as
    metrics (``routing/own_share/<task>`` at step = version); the final version's mean own share
    as ``routing/own_share_mean``, its matrix as ``routing/final_all.csv``."""
    from .benchmark import get_benchmark
    from .plots import routing_heatmap
    from .registry import Registry
    from .registry.evaluations import read_evaluation
    from .tracking import matrix_csv

    registry = Registry(config.registry_uri())
    run = config.run.name
    profile = get_benchmark(config.benchmark).eval_profile(config)
    tasks = config.data.tasks
    final: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for version in registry.versions(run):
            record = read_evaluation(registry, run, version, profile)
            trained = tasks[:version]
            matrix = routing_matrix(record["scores"], trained) if record else None
            if matrix is None:
                continue
            square = [row[:version] for row in matrix]
            own = own_shares(square, version)
            tracker.log_metrics(run_id, {f"routing/own_share/{t}": v for t, v in zip(trained, own)}, step=version)
            path = Path(folder) / f"routing_v{version}.csv"
            path.write_text(matrix_csv(square, trained))
            tracker.log_file(run_id, path, "routing")
            tracker.log_file(run_id, routing_heatmap(square, trained, Path(folder) / f"routing_v{version}.png",
                                                     title=f"{run}: who routes to whom, version {version}"), "routing")
            if version == len(tasks):
                final = {"routing/own_share_mean": sum(own) / len(own)}
                final_path = Path(folder) / "final_all.csv"
                final_path.write_text(matrix_csv(square, trained))
                tracker.log_file(run_id, final_path, "routing")
    if final:
        tracker.log_metrics(run_id, final)
    return final

