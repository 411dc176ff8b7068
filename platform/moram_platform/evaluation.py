"""Evaluate a registry version on tasks: base model + the version's shards, nothing trained.

A δ or pruning choice is a view applied at load time (DESIGN: the memory registry), which is
what the δ stage of a sweep uses: evaluation-only, no new atom.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .benchmark import Benchmark, get_benchmark
from .config import JobConfig
from .routing_diagnostics import evaluate_with_routing, task_blocks
from .training import build_moram_model, seed_everything


@torch.no_grad()
def evaluate_shards(config: JobConfig, benchmark: Benchmark, shards: list[bytes], tasks: list[str],
                    device: str | torch.device = "cpu", delta: float | None = None,
                    prune_mass: float | None = None, progress: bool = True,
                    task_bar: Callable[..., Any] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"metric", "score", "n", "profile"}} for the model that ``shards`` stand for.

    ``task_bar`` (a tqdm-like class, e.g. Ray's ``tqdm_ray`` inside a Ray task) draws a bar per
    task while it is scored and leaves it as that task's line with its score."""
    seed_everything(config.run.seed)
    model, processor = build_moram_model(config, benchmark, [], torch.device(device))
    model.load_shards(shards, prune_mass=prune_mass)
    model.to(device)
    if delta is not None:
        model.set_routing(delta=delta)
    model.eval()
    # Diagnostics hook: where the model routes routing weights, each task's record also gets
    # the share of routing mass on every task's atoms (routing_diagnostics.py).
    def evaluate_task(task: str) -> dict[str, Any]:
        return benchmark.evaluate(config, model, processor, task, progress=progress)

    if task_bar is not None:
        evaluate_task = _with_task_bar(evaluate_task, task_bar, len(shards))
    return evaluate_with_routing(model, task_blocks(shards, prune_mass), tasks=tasks, evaluate_task=evaluate_task)


def _with_task_bar(evaluate_task, bar_class, version: int):
    label = "zero-shot" if version == 0 else f"version {version}"

    def scored(task: str) -> dict[str, Any]:
        bar = bar_class(total=1, desc=f"  eval {label}: {task}", unit="task")
        result = evaluate_task(task)
        bar.set_description(f"  eval {label}: {task} {result['score']:.1f} ({result['metric']}, n={result['n']})")
        bar.update(1)
        bar.close()
        return result

    return scored


def evaluate_version_task(config_dict: dict, registry_uri: str, run_id: str, version: int | None,
                          tasks: list[str], delta: float | None = None, prune_mass: float | None = None,
                          progress: bool = False, task_bars: bool = False) -> dict[str, dict[str, Any]]:
    """The same, reading the version from the registry (runs inside a Ray task or locally);
    ``task_bars`` (inside a Ray task): a bar per task, which the driver's terminal shows."""
    from .config import config_from_dict
    from .registry import Registry

    config = config_from_dict(config_dict)
    shards = Registry(registry_uri).read_shards(run_id, version) if version else []
    device = "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    task_bar = None
    if task_bars:
        from ray.experimental.tqdm_ray import tqdm as task_bar
    return evaluate_shards(config, get_benchmark(config.benchmark), shards, tasks, device,
                           delta=delta, prune_mass=prune_mass, progress=progress, task_bar=task_bar)
