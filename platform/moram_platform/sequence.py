"""The sequence driver: task after task, train on Ray Train, commit, evaluate, track.

    for each task of the order:
        current version (registry actor) -> Ray Train workers train the task's atoms (DeepSpeed)
        -> rank 0 commits the new shard -> evaluate the new version on the tasks eval.schedule
        names (every task, the tasks seen, or the new one and, after the last task, all)
        -> append the accuracy-matrix row -> MLflow (child run per task, parent per sequence)

One evaluator actor per sequence keeps the base model loaded and swaps each version's atoms in
(evaluation.py); it records each task's score in the registry as soon as it has it.

Everything a rerun needs is in storage: committed versions are never retrained, recorded
evaluations are never recomputed, and MLflow runs are found again by their tags.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from moram import MoRAMConfig
from .benchmark import Benchmark, get_benchmark
from .cluster import start_ray, worker_resources
from .config import ConfigError, JobConfig
from .plots import accuracy_heatmap, activation_heatmap
from .registry import Registry, RegistryError, RunLease
from .registry.evaluations import read_evaluation, record_evaluation
from .routing_diagnostics import training_blocks
from .schedule import baseline_wanted, tasks_after
from .tracking import Tracker, matrix_csv, sequence_note, sequence_params, system_tags

log = logging.getLogger(__name__)


@dataclass
class SequenceResult:
    run_id: str
    tasks: list[str]
    matrix: list[list[float | None]]     # None: a cell eval.schedule does not evaluate
    baseline: list[float] | None
    summary: dict[str, float]
    versions: list[int]
    registry_uri: str
    mlflow_run_id: str
    mlflow_url: str
    trained: list[str] = field(default_factory=list)   # tasks trained by this call (not resumed)
    # Wall seconds of this call by phase (bench/sequence_bench.py): "start" (Ray, MLflow, the run
    # actor), then per task "train" (the Ray Train fit: worker group start/stop, model, engine,
    # steps, the commit), "train_steps" (the chief's train_task, as it measured it), "evaluate",
    # "log" (MLflow: metrics, shard, plots).
    timings: dict[str, list[float]] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(t) for t in self.tasks) + 2
        lines = ["after \\ on".ljust(width) + "".join(t[:10].rjust(11) for t in self.tasks)]
        if self.baseline is not None:
            lines.append("zero-shot".ljust(width) + "".join(_cell(v) for v in self.baseline))
        for task, row in zip(self.tasks, self.matrix):
            lines.append(task.ljust(width) + "".join(_cell(v) for v in row))
        lines.append("")
        lines += [f"{name:<32}{value:8.2f}" for name, value in self.summary.items()]
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-".rjust(11) if value is None else f"{value:11.2f}"


def default_run_id(config: JobConfig) -> str:
    model = re.sub(r"[^A-Za-z0-9]+", "-", Path(config.model.source).stem).strip("-").lower()[:24]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.benchmark}-{model}-{config.moram_config.method}-{stamp}"


def check_resources(config: JobConfig) -> None:
    """Fail fast when the workers can never be scheduled (Ray would wait forever). A cluster
    that autoscales may add nodes later, so there a shortfall is only a warning."""
    import ray

    scaling = config.scaling
    have = ray.cluster_resources()
    needs = {key: scaling.num_workers * value for key, value in worker_resources(config).items()}
    for resource, need in needs.items():
        if need <= have.get(resource, 0):
            continue
        key = "scaling.use_gpu" if resource == "GPU" else "scaling.cpus_per_worker"
        message = (f"{key}: {scaling.num_workers} workers need {need:g} {resource}s, the Ray cluster has "
                   f"{have.get(resource, 0):g}" + (" (set scaling.use_gpu=false to train on CPU)" if resource == "GPU" else ""))
        if os.environ.get("RAY_ADDRESS"):
            log.warning("%s; waiting for the cluster to scale up", message)
        else:
            raise ConfigError(message)


def run_sequence(config: JobConfig, *, stop_after: int | None = None, parent_mlflow_run: str | None = None,
                 on_task_done: Callable[[int, list[list[float]], list[float] | None], None] | None = None,
                 progress: bool = True, checked: bool = False) -> SequenceResult:
    """Run (or resume) the continual-learning sequence ``config`` describes.

    ``stop_after`` ends the call after that many tasks (a later call resumes);
    ``parent_mlflow_run`` nests the sequence's MLflow run (a sweep trial);
    ``on_task_done(task_index, matrix_so_far, baseline)`` is called after every task's row,
    e.g. to report to Ray Tune so a scheduler can stop a weak trial early;
    ``checked``: the caller has resolved ``config.with_absolute_paths()`` and validated it with
    its benchmark (the job entry point does, before Ray starts), so neither is done twice.
    """
    benchmark = get_benchmark(config.benchmark)
    if not checked:
        config = config.with_absolute_paths()
        benchmark.validate(config)                  # every task and data row, before anything starts
    run_id = config.run.name or default_run_id(config)
    registry = Registry(config.registry_uri())
    _check_resumable(registry, run_id, config)
    with RunLease.acquire(registry.storage, run_id):   # one driver per run: a second one stops here
        return _drive(config, benchmark, run_id, registry, stop_after, parent_mlflow_run, on_task_done, progress)


def _drive(config: JobConfig, benchmark: Benchmark, run_id: str, registry: Registry, stop_after: int | None,
           parent_mlflow_run: str | None, on_task_done, progress: bool) -> SequenceResult:
    timings: dict[str, list[float]] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings.setdefault(phase, []).append(round(now - clock, 3))
        clock = now

    model_ref = benchmark.model_ref(config)

    start_ray()
    check_resources(config)
    from .registry.actor import get_registry_actor

    actor = get_registry_actor(config.registry_uri(), run_id)
    tracker = Tracker(config.tracking_uri(), config.mlflow.experiment or config.benchmark, run_id,
                      parent_run_id=parent_mlflow_run)
    tags = {"moram.method": config.moram_config.method, "moram.model": model_ref[0],
            "moram.order": ",".join(config.data.tasks), "moram.registry": registry.uri,
            "moram.benchmark": config.benchmark, "moram.eval_profile": benchmark.eval_profile(config),
            **system_tags()}
    params = sequence_params(config)
    parent, resumed = tracker.start_sequence(params, tags)
    if not resumed:
        tracker.log_text(parent, yaml.safe_dump(config.to_dict(), sort_keys=False), "resolved_config.yaml")
    log.info("run %s: %s (MLflow run %s)", run_id, "resuming" if resumed else "starting", parent)

    tasks = config.data.tasks
    scores = Scores(config, benchmark, registry, run_id, progress)
    matrix: list[list[float | None]] = []
    versions: list[int] = []
    trained: list[str] = []
    lap("start")
    try:
        baseline = scores.row(0, tasks) if baseline_wanted(config.eval.schedule, config.eval.baseline) else None
        lap("evaluate")
        for index, task in enumerate(tasks):
            child, finished = tracker.task_run(index, task, params, tags)
            version = _committed(actor, index + 1)      # the run's registry actor: storage's view
            if version is None:
                trained.append(task)
                version = _train(config, run_id, index, model_ref, progress)
                timings.setdefault("train_steps", []).append(float(version.metrics.get("train_wall_s", 0.0)))
            lap("train")
            row = scores.row(version.version, tasks_after(config.eval.schedule, tasks, index))
            lap("evaluate")
            matrix.append(row)
            versions.append(version.version)
            if not finished:
                _log_task(tracker, child, config, registry, run_id, version, row)
            _log_matrix(tracker, parent, tasks, matrix, baseline)
            _log_progress(tracker, parent, config, benchmark, run_id, matrix, baseline, tags)
            lap("log")
            if on_task_done is not None:
                on_task_done(index, matrix, baseline)
            if stop_after is not None and index + 1 >= stop_after:
                break
    except BaseException:
        tracker.finish(parent, status="FAILED")
        raise
    finally:
        scores.close()
    summary = benchmark.summary(matrix, baseline, tasks) if len(matrix) == len(tasks) else {}
    if summary:  # its metrics are the last task's step of the curves (_log_progress)
        tracker.set_tags(parent, {"moram.version": str(versions[-1])})
    tracker.finish(parent, status="FINISHED" if len(matrix) == len(tasks) else "KILLED")
    return SequenceResult(run_id, tasks, matrix, baseline, summary, versions, registry.uri, parent,
                          tracker.ui_url(parent), trained, timings)


# -- steps ---------------------------------------------------------------------------------------
def _train(config: JobConfig, run_id: str, index: int, model_ref, progress: bool):
    from .ray_train import fit_task

    registry = Registry(config.registry_uri())
    parent = index if index > 0 else None
    started = time.perf_counter()
    fit_task(config, run_id, index, parent, model_ref, progress)
    version = _find_version(registry, run_id, index + 1)
    if version is None:
        raise RegistryError(f"run {run_id}: task {config.data.tasks[index]} finished training "
                            f"but version {index + 1} was not committed")
    log.info("task %s trained and committed as version %d in %.1fs", version.task, version.version,
             time.perf_counter() - started)
    return version


class Scores:
    """A sequence's evaluations: each (version, task) scored once and recorded in the registry,
    by the sequence's evaluator actor (started on the first score missing) or, with
    ``eval.evaluator: task``, a fresh Ray task per version."""

    def __init__(self, config: JobConfig, benchmark: Benchmark, registry: Registry, run_id: str, progress: bool):
        self.config, self.registry, self.run_id, self.progress = config, registry, run_id, progress
        self.profile = benchmark.eval_profile(config)
        self.actor = None

    def row(self, version: int, tasks: list[str]) -> list[float | None]:
        """``version``'s scores on the order's tasks, None for a task not in ``tasks``."""
        recorded = (read_evaluation(self.registry, self.run_id, version, self.profile) or {}).get("scores", {})
        missing = [task for task in tasks if task not in recorded]
        if missing:
            self._evaluate(version, missing)
            recorded = read_evaluation(self.registry, self.run_id, version, self.profile)["scores"]
        return [float(recorded[task]["score"]) if task in tasks else None for task in self.config.data.tasks]

    def _evaluate(self, version: int, tasks: list[str]) -> None:
        import ray

        if uses_actor(self.config):
            from .evaluation import evaluator_actor

            if self.actor is None:
                self.actor = evaluator_actor(self.config, self.run_id)
            ray.get(self.actor.evaluate.remote(version, tasks, task_bars=self.progress))
        else:
            found = _evaluate_remote(self.config, self.run_id, version, tasks, self.progress)
            record_evaluation(self.registry, self.run_id, version, self.profile, found)

    def close(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor)   # its model's memory goes back now, not when the driver exits
            self.actor = None


def uses_actor(config: JobConfig) -> bool:
    """eval.evaluator; auto: the actor on CPU. On GPU a one-shot task per version holds the
    workers' GPU share only while it evaluates (an actor holding it would keep the next task's
    workers from starting on a machine with one GPU per worker)."""
    return config.eval.evaluator == "actor" or (config.eval.evaluator == "auto" and not config.scaling.use_gpu)


def _evaluate_remote(config: JobConfig, run_id: str, version: int, tasks: list[str],
                     progress: bool = False) -> dict[str, Any]:
    import ray

    from .evaluation import evaluate_version_task

    resources = worker_resources(config)
    options = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0)}
    # DEFAULT: outside any placement group this process runs in (a Tune trial's would capture it).
    remote = ray.remote(evaluate_version_task).options(**options, max_retries=2, scheduling_strategy="DEFAULT")
    return ray.get(remote.remote(config.to_dict(), config.registry_uri(), run_id, version or None,
                                 tasks, task_bars=progress))   # a line per task scored


def _log_task(tracker: Tracker, child: str, config: JobConfig, registry: Registry, run_id: str, version, row):
    from .ray_train import LOSS_CURVE

    tasks = config.data.tasks
    metrics = {k: v for k, v in version.metrics.items() if isinstance(v, (int, float))}
    index = version.task_index
    metrics["task_score"] = row[index]
    metrics.update({f"eval/{task}": score for task, score in zip(tasks, row) if score is not None})
    tracker.log_new_metrics(child, metrics)
    losses = version.metrics.get(LOSS_CURVE) or []   # recorded by the chief worker with the commit
    tracker.log_new_series(child, "train_loss", {step: loss for step, loss in enumerate(losses, start=1)})
    tracker.set_tags(child, {"moram.version": str(version.version), "moram.registry": registry.uri})
    with tempfile.TemporaryDirectory() as folder:
        from moram import read_shard

        shards = registry.read_shards(run_id, version.version)
        shard_bytes = shards[-1]
        shard_path = Path(folder) / f"{index:02d}-{version.task}.safetensors"
        shard_path.write_bytes(shard_bytes)
        tracker.log_file(child, shard_path, "shard")
        shard = read_shard(shard_bytes, name=shard_path.name)
        mass = {name: shard.layer(name)["routing_mass"].numpy() for name in shard.layer_names}
        heatmap = activation_heatmap(mass, Path(folder) / "activation_map.png", task_atoms=training_blocks(shards),
                                     task_names=tasks[: index + 1],
                                     title=f"atom activation during {version.task} (version {version.version})")
        tracker.log_file(child, heatmap)   # top level: the compare view shows top-level artifacts only
    tracker.finish(child)


def _log_matrix(tracker: Tracker, parent: str, tasks: list[str], matrix, baseline) -> None:
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "accuracy_matrix.csv"
        csv_path.write_text(matrix_csv(matrix, tasks))
        tracker.log_file(parent, csv_path)
        tracker.log_file(parent, accuracy_heatmap(matrix, tasks, Path(folder) / "accuracy_matrix.png"))
        if baseline is not None:
            tracker.log_text(parent, matrix_csv([baseline], tasks, row_names=["zero-shot"]), "zero_shot_row.csv")


def _log_progress(tracker: Tracker, parent: str, config: JobConfig, benchmark: Benchmark, run_id: str,
                  matrix: list[list[float]], baseline: list[float] | None, tags: dict[str, str]) -> None:
    """After task i, on the parent at step i: every task's score (``eval/<task>``) and the summary
    over the i+1 tasks seen (OP, the BWT variants, FWT...): the learning and forgetting curves.
    Each (key, step) once, so a resume that walks its finished tasks again adds nothing. The
    run's description (the matrix and the summary so far) is rewritten."""
    tasks, seen = config.data.tasks, len(matrix)
    summary = benchmark.summary([row[:seen] for row in matrix], baseline[:seen] if baseline else None, tasks[:seen])
    scores = {f"eval/{task}": score for task, score in zip(tasks, matrix[-1]) if score is not None}
    tracker.log_new_metrics(parent, {**scores, **summary}, step=seen - 1)
    facts = {name: tags[f"moram.{name}"] for name in ("method", "model", "benchmark", "eval_profile")}
    tracker.set_note(parent, sequence_note(run_id, tasks, matrix, baseline, summary, facts))


def _committed(actor, number: int):
    """Version ``number`` if it is committed, else None, asked through the run's registry actor."""
    import ray

    return None if number not in ray.get(actor.versions.remote()) else ray.get(actor.version.remote(number))


def _find_version(registry: Registry, run_id: str, number: int):
    from .registry import VersionNotFoundError

    try:
        return registry.version(run_id, number)
    except VersionNotFoundError:
        return None


def _check_resumable(registry: Registry, run_id: str, config: JobConfig) -> None:
    """A rerun with the same run id must describe the same sequence; otherwise say so."""
    latest = registry.latest(run_id)
    if latest is None:
        return
    committed = [shard.task for shard in latest.shards]
    if committed != config.data.tasks[: len(committed)]:
        raise ConfigError(f"run.name: run {run_id} already committed tasks {committed}, which is not a prefix "
                          f"of data.tasks {config.data.tasks}; use a new run name")
    if MoRAMConfig.from_dict(latest.config) != config.moram_config:  # keys added later take defaults
        raise ConfigError(f"moram: run {run_id} was trained with {latest.config}; this config differs "
                          f"({config.moram_config.to_dict()}); use a new run name")
