"""Evaluate registry versions on tasks: base model + a version's shards, nothing trained.

``VersionEvaluator`` loads the base model once and swaps each version's atoms in (the
registry's shards, ``MoRAMModel.load_shards``), the way ``from_pretrained`` builds a memory on
a base model; ``EvaluatorActor`` is the same as one long-lived Ray actor per sequence, which
records every task's score in the registry as soon as it has it (a restarted actor redoes only
the task it was on). ``evaluate_version_task`` is the one-shot form: a fresh process and model
load per version (``eval.evaluator: task``, and the δ stage of a sweep).

A δ or pruning choice is a view applied at load time (DESIGN: the memory registry), which is
what the δ stage of a sweep uses: evaluation-only, no new atom.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Sequence

import torch

from .benchmark import Benchmark, get_benchmark
from .config import JobConfig
from .routing_diagnostics import evaluate_with_routing, task_blocks
from .training import build_moram_model, seed_everything

log = logging.getLogger(__name__)


class VersionEvaluator:
    """The base model of ``config``, loaded once; ``load`` swaps a version's atoms in."""

    def __init__(self, config: JobConfig, benchmark: Benchmark | None = None, device: str | torch.device = "cpu"):
        self.config = config
        self.benchmark = benchmark or get_benchmark(config.benchmark)
        # A benchmark instance may cache what the model computed (X-TAIL: the class names' text
        # features, through the text encoder's atoms): each loaded version gets a fresh one.
        self._own_benchmark = benchmark is None
        self.device = torch.device(device)
        seed_everything(config.run.seed)
        self.model, self.processor = build_moram_model(config, self.benchmark, [], self.device)
        self.model.eval()
        self.blocks: dict[str, list[int]] | None = None
        self.version = 0

    @torch.no_grad()
    def load(self, shards: Sequence[bytes], delta: float | None = None, prune_mass: float | None = None) -> None:
        """The model that ``shards`` stand for (all earlier atoms dropped), with the config's δ
        unless ``delta`` gives another view."""
        self.model.load_shards(shards, prune_mass=prune_mass)
        if self._own_benchmark:
            self.benchmark = get_benchmark(self.config.benchmark)
        prepare_for_evaluation(self.model, self.config)
        self.model.to(self.device)
        self.model.set_routing(delta=self.config.moram_config.delta if delta is None else delta)
        self.model.eval()
        self.blocks = task_blocks(shards, prune_mass)
        self.version = len(shards)

    @torch.no_grad()
    def score(self, tasks: Sequence[str], progress: bool = True, task_bar: Callable[..., Any] | None = None,
              on_scored: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """{task: {"metric", "score", "n", "profile"[, "routing"]}} for the loaded version; where
        the model routes, each task's record also gets the share of routing mass on every task's
        atoms (routing_diagnostics.py). ``on_scored(task, result)`` after each task.
        ``task_bar`` (a tqdm-like class, e.g. Ray's ``tqdm_ray``) draws a bar per task while it
        is scored and leaves it as that task's line with its score."""
        def evaluate_task(task: str) -> dict[str, Any]:
            return self.benchmark.evaluate(self.config, self.model, self.processor, task, progress=progress)

        if task_bar is not None:
            evaluate_task = _with_task_bar(evaluate_task, task_bar, self.version)
        results = {}
        for task in tasks:
            results[task] = evaluate_with_routing(self.model, self.blocks, tasks=[task], evaluate_task=evaluate_task)[task]
            if on_scored is not None:
                on_scored(task, results[task])
        return results


@torch.no_grad()
def evaluate_shards(config: JobConfig, benchmark: Benchmark, shards: list[bytes], tasks: list[str],
                    device: str | torch.device = "cpu", delta: float | None = None,
                    prune_mass: float | None = None, progress: bool = True,
                    task_bar: Callable[..., Any] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"metric", "score", "n", "profile"}} for the model that ``shards`` stand for, on a
    freshly loaded base model."""
    evaluator = VersionEvaluator(config, benchmark, device)
    evaluator.load(shards, delta=delta, prune_mass=prune_mass)
    return evaluator.score(tasks, progress=progress, task_bar=task_bar)


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


def _device(config: JobConfig) -> str:
    return "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"


def evaluate_version_task(config_dict: dict, registry_uri: str, run_id: str, version: int | None,
                          tasks: list[str], delta: float | None = None, prune_mass: float | None = None,
                          progress: bool = False, task_bars: bool = False) -> dict[str, dict[str, Any]]:
    """The same, reading the version from the registry (runs inside a Ray task or locally);
    ``task_bars`` (inside a Ray task): a bar per task, which the driver's terminal shows."""
    from .config import config_from_dict
    from .registry import Registry

    config = config_from_dict(config_dict)
    shards = Registry(registry_uri).read_shards(run_id, version) if version else []
    task_bar = None
    if task_bars:
        from ray.experimental.tqdm_ray import tqdm as task_bar
    return evaluate_shards(config, get_benchmark(config.benchmark), shards, tasks, _device(config),
                           delta=delta, prune_mass=prune_mass, progress=progress, task_bar=task_bar)


class EvaluatorActor:
    """One sequence's evaluator as a Ray actor (``evaluator_actor``): the base model stays loaded
    between versions, and each task's score is recorded in the registry once it exists, so an
    actor that dies mid-version (Ray restarts it) scores only the tasks still missing."""

    def __init__(self, config_dict: dict, registry_uri: str, run_id: str, threads: int):
        from .config import config_from_dict
        from .registry import Registry

        torch.set_num_threads(threads)   # a zero-CPU actor gets one thread from Ray otherwise
        self.config = config_from_dict(config_dict)
        self.registry = Registry(registry_uri)
        self.run_id = run_id
        self.evaluator = VersionEvaluator(self.config, device=_device(self.config))

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, version: int, tasks: list[str], task_bars: bool = False) -> list[str]:
        """Score ``version`` on those of ``tasks`` not yet recorded; the tasks it scored."""
        from .registry.evaluations import read_evaluation, record_task_evaluation

        profile = self.evaluator.benchmark.eval_profile(self.config)
        recorded = (read_evaluation(self.registry, self.run_id, version, profile) or {}).get("scores", {})
        todo = [task for task in tasks if task not in recorded]
        if not todo:
            return []
        self.evaluator.load(self.registry.read_shards(self.run_id, version) if version else [])
        task_bar = None
        if task_bars:
            from ray.experimental.tqdm_ray import tqdm as task_bar

        def record(task: str, result: dict[str, Any]) -> None:
            record_task_evaluation(self.registry, self.run_id, version, profile, task, result)

        self.evaluator.score(todo, progress=False, task_bar=task_bar, on_scored=record)
        return todo


def evaluator_actor(config: JobConfig, run_id: str):
    """A sequence's ``EvaluatorActor``, named after the run (one per run).

    It holds no logical CPU: the sequence driver trains and evaluates in turn, so its evaluator
    never computes while the run's Ray Train workers hold their CPUs, and reserving them for the
    whole sequence would leave the workers unschedulable on a small machine; it uses the
    workers' CPU count, rounded up, as threads (1.9 CPUs beside a 0.1-CPU trial: both cores).
    Ray restarts it when it dies and retries the call."""
    import ray

    actor_class = ray.remote(EvaluatorActor)
    return actor_class.options(
        name=f"moram-evaluator-{run_id}", num_cpus=0, max_restarts=3, max_task_retries=3,
        scheduling_strategy="DEFAULT",   # outside a Tune trial's placement group, like the workers
    ).remote(config.to_dict(), config.registry_uri(), run_id, math.ceil(config.scaling.cpus_per_worker))


def prepare_for_evaluation(model, config: JobConfig) -> None:
    """What the evaluated model carries besides its version's atoms (call it after load_shards):
    with ``moram.route_untrained``, the next task's fresh block (B = 0, seeded as that task's own)
    taking part in routing, as in every checkpoint the official TRACE code evaluates
    (``MoRAMModel.open_untrained_block``; docs/parity.md, row M3); otherwise nothing. Only methods
    that route (MoRAM, MoE-LoRA) get it: in the others a B = 0 block changes no output."""
    from .routing_diagnostics import routes

    if config.moram_config.route_untrained and routes(model.method):
        model.open_untrained_block()
