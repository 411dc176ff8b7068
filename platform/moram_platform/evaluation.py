"""Evaluate a registry version on tasks: base model + the version's shards, nothing trained.

A δ or pruning choice is a view applied at load time (DESIGN: the memory registry), which is
what the δ stage of a sweep uses: evaluation-only, no new atom.
"""
from __future__ import annotations

from typing import Any

import torch

from .benchmark import Benchmark, get_benchmark
from .config import JobConfig
from .routing_diagnostics import evaluate_with_routing, task_blocks
from .training import build_moram_model, seed_everything


@torch.no_grad()
def evaluate_shards(config: JobConfig, benchmark: Benchmark, shards: list[bytes], tasks: list[str],
                    device: str | torch.device = "cpu", delta: float | None = None,
                    prune_mass: float | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """{task: {"metric", "score", "n", "profile"}} for the model that ``shards`` stand for."""
    seed_everything(config.run.seed)
    model, processor = build_moram_model(config, benchmark, [], torch.device(device))
    model.load_shards(shards, prune_mass=prune_mass)
    model.to(device)
    if delta is not None:
        model.set_routing(delta=delta)
    model.eval()
    # Diagnostics hook: where the model routes routing weights, each task's record also gets
    # the share of routing mass on every task's atoms (routing_diagnostics.py).
    return evaluate_with_routing(model, task_blocks(shards, prune_mass), tasks=tasks,
                                 evaluate_task=lambda task: benchmark.evaluate(config, model, processor, task,
                                                                               progress=progress))


def evaluate_version_task(config_dict: dict, registry_uri: str, run_id: str, version: int | None,
                          tasks: list[str], delta: float | None = None, prune_mass: float | None = None,
                          progress: bool = False) -> dict[str, dict[str, Any]]:
    """The same, reading the version from the registry (runs inside a Ray task or locally)."""
    from .config import config_from_dict
    from .registry import Registry

    config = config_from_dict(config_dict)
    shards = Registry(registry_uri).read_shards(run_id, version) if version else []
    device = "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    return evaluate_shards(config, get_benchmark(config.benchmark), shards, tasks, device,
                           delta=delta, prune_mass=prune_mass, progress=progress)
