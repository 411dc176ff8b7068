"""One task on Ray Train: a TorchTrainer whose workers run ``training.train_task``.

Rank 0 commits the task's shard to the run's registry actor; a worker lost mid-task is
restarted by Ray Train (FailureConfig) from the last checkpoint it reported.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .benchmark import get_benchmark
from .cluster import worker_resources
from .config import JobConfig, config_from_dict
from .registry import BaseModelRef
from .registry.actor import get_registry_actor
from .training import Progress, World, carry_folders, steps_per_task, train_task

# Fault injection for tests and drills, read by the driver: the chief worker dies at this
# optimizer step on its first attempt (no checkpoint restored yet), like a preempted node;
# "commit": it dies right after committing the task's version, before reporting.
FAULT_ENV = "MORAM_FAULT_AT_STEP"
LOSS_CURVE = "train_loss_per_step"   # in a version's metrics: [loss of step 1, step 2, ...]


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    config = config_from_dict(loop["config"])
    benchmark = get_benchmark(config.benchmark)
    context = ray.train.get_context()
    world = World(rank=context.get_world_rank(), size=context.get_world_size(),
                  device=ray.train.torch.get_device())
    registry = get_registry_actor(loop["registry_uri"], loop["run_id"])
    parent = loop["parent_version"]
    if loop["task_index"] + 1 in ray.get(registry.versions.remote()):
        # A worker group restarted after the chief committed (e.g. it failed in its last report):
        # the task is done; training it again could only conflict with the committed version.
        ray.train.report({"version": loop["task_index"] + 1, "already_committed": 1})
        return
    shards = ray.get(registry.read_shards.remote(parent)) if parent else []
    checkpoint = ray.train.get_checkpoint()
    fault = loop.get("fault_at_step") or "0"
    fault_after_commit = fault == "commit" and checkpoint is None
    fault_step = int(fault) if fault.isdigit() and checkpoint is None else 0
    bar = _training_bar(config, benchmark, loop["task_index"], world) if loop["progress"] and world.is_chief else None

    def on_step(progress: Progress) -> None:
        if bar is not None:
            bar.n = progress.step
            bar.set_description(f"{bar.label} loss {progress.losses[-1]:.3f}")
        if fault_step and world.is_chief and progress.step == fault_step:
            os._exit(1)  # a hard crash, no cleanup: what a lost node looks like to Ray

    def on_checkpoint(progress: Progress, save) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            ray.train.report({"step": progress.step, "train_loss": progress.losses[-1]},
                             checkpoint=Checkpoint.from_directory(folder))

    step_kwargs = dict(on_step=on_step, on_checkpoint=on_checkpoint, progress_bar=False,
                       **carry_folders(config, loop["run_id"], loop["task_index"]))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            result = train_task(config, benchmark, loop["task_index"], shards, world, checkpoint_dir=folder,
                                **step_kwargs)
    else:
        result = train_task(config, benchmark, loop["task_index"], shards, world, **step_kwargs)
    if bar is not None:
        bar.close()
    metrics = result.metrics()
    if checkpoint is not None:
        metrics["resumed_from_step"] = result.resumed_from_step
    if world.is_chief:
        model_id, revision = loop["base_model"]
        # The loss curve goes with the version: the driver logs it to MLflow from there (workers
        # never talk to MLflow), also on a rerun after a driver lost between commit and logging.
        version = ray.get(registry.commit.remote(result.shard, base_model=BaseModelRef(model_id, revision),
                                                 metrics={**metrics, LOSS_CURVE: _json_losses(result.progress)}))
        metrics["version"] = version.version
        if fault_after_commit:
            os._exit(1)  # committed, then lost before reporting: the restarted group must not retrain
    ray.train.report(metrics)


def _training_bar(config, benchmark, task_index: int, world: World):
    """The chief worker's training bar, drawn by the driver (Ray's tqdm: one bar, whatever the
    worker count, and no worker log lines on the terminal)."""
    from ray.experimental.tqdm_ray import tqdm

    task = config.data.tasks[task_index]
    total = steps_per_task(config, task_index, len(benchmark.train_examples(config, task)), world.size)
    bar = tqdm(total=total, desc=f"  train {task} [{task_index + 1}/{len(config.data.tasks)}]", unit="step")
    bar.label = bar._desc
    return bar


def _json_losses(progress: Progress) -> list[float | None]:
    """The mean loss of optimizer steps 1..n, as JSON (a non-finite loss as null)."""
    return [loss if math.isfinite(loss) else None for loss in progress.losses]


def fit_task(config: JobConfig, run_id: str, task_index: int, parent_version: int | None,
             base_model: tuple[str, str | None], progress: bool = True) -> None:
    """Train one task with Ray Train; rank 0 commits the new version to the registry."""
    scaling = config.scaling
    resources = worker_resources(config)
    storage = config.run.storage_path or str(Path(config.run.output_dir).resolve() / "ray_train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(), "run_id": run_id, "task_index": task_index,
            "parent_version": parent_version, "registry_uri": config.registry_uri(),
            "base_model": list(base_model), "fault_at_step": os.environ.get(FAULT_ENV), "progress": progress,
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{run_id}-task-{task_index}", storage_path=str(storage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
