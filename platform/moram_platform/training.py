"""One task of a continual-learning sequence, as a plain function.

``train_task`` runs in one process (a laptop, a lone GPU box) or as one of the data-parallel
workers Ray Train starts (``moram_platform.ray_train``); nothing in it imports Ray. It:
loads the base model and the parent version's shards, adds the task's fresh atoms, trains them
with the configured engine, sums the activation statistics over workers, prunes and freezes,
and returns the task's shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from moram import MoRAMModel, TaskReport, get_moram_model

from .benchmark import Benchmark, batches
from .config import JobConfig
from .engine import build_engine

log = logging.getLogger(__name__)

ATOMS_FILE, STATE_FILE = "atoms.safetensors", "state.json"


@dataclass
class World:
    """This process's place in the data-parallel group."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


@dataclass
class Progress:
    """Where training stands inside a task; saved with every checkpoint."""

    epoch: int = 0
    micro_batch: int = 0          # micro-batches of this epoch already done by this worker
    step: int = 0                 # optimizer steps done in this task
    samples: int = 0              # training examples seen by all workers together
    losses: list[float] = field(default_factory=list)   # mean loss per optimizer step


@dataclass
class TaskResult:
    task: str
    task_index: int
    shard: bytes
    report: TaskReport
    progress: Progress
    wall_s: float
    resumed_from_step: int = 0

    def metrics(self) -> dict[str, float]:
        p = self.progress
        return {
            "train_loss_final": p.losses[-1] if p.losses else float("nan"),
            "train_steps": p.step,
            "train_samples": p.samples,
            "train_wall_s": round(self.wall_s, 3),
            "train_samples_per_s": round(p.samples / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            "atoms_added": self.report.atoms_added,
            "atoms_kept": self.report.atoms_kept,
            "atoms_pruned": self.report.atoms_dropped,
        }


# -- model ---------------------------------------------------------------------------------------
def build_moram_model(config: JobConfig, benchmark: Benchmark, shards: list[bytes], device: torch.device):
    """Base model + the shards of a version: the model that version stands for."""
    base, processor = benchmark.load_model(config)
    model = get_moram_model(base, config.moram_config)
    model.load_shards(shards)
    return model.to(device), processor


# -- the task ------------------------------------------------------------------------------------
def train_task(
    config: JobConfig,
    benchmark: Benchmark,
    task_index: int,
    parent_shards: list[bytes],
    world: World | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_step: Callable[[Progress], None] | None = None,
    on_checkpoint: Callable[[Progress, Callable[[Path], None]], None] | None = None,
    progress_bar: bool = True,
    carry_from: str | os.PathLike | None = None,
    carry_to: str | os.PathLike | None = None,
) -> TaskResult:
    """Train task ``task_index`` of ``config.data.tasks`` on top of ``parent_shards``.

    ``checkpoint_dir`` resumes a task from a checkpoint written by ``save_checkpoint``;
    ``on_checkpoint(progress, save)`` is called every ``train.checkpoint_every_steps`` steps
    with a function that writes this worker's part of a checkpoint into a folder.
    With ``train.optimizer_across_tasks: carry``, the optimizer continues from what the previous
    task wrote into ``carry_from`` (``carry_to`` of that task; see ``engine.CarriedOptimizer``).
    """
    world = world or World()
    task = config.data.tasks[task_index]
    carried = None if checkpoint_dir is not None else read_carry(config, task_index, carry_from, world)
    seed_everything(config.run.seed + task_index)
    started = time.perf_counter()

    model, processor = build_moram_model(config, benchmark, parent_shards, world.device)
    model.begin_task(task)
    model.to(world.device)  # the fresh atoms join the model's device
    if world.size == 1 and config.train.engine == "deepspeed":
        _single_process_group(world.device)
    progress = Progress()
    if checkpoint_dir is not None:  # atoms first: an engine copies them into its master weights
        progress = load_checkpoint_atoms(Path(checkpoint_dir), model, world)
        log.info("task %s resumes at step %d (epoch %d)", task, progress.step, progress.epoch)
    examples = benchmark.train_examples(config, task)
    total_steps = steps_per_task(config, task_index, len(examples), world.size)
    engine = build_engine(model, benchmark.loss, config.train, world.size, total_steps)
    if checkpoint_dir is not None:
        load_checkpoint_optimizer(Path(checkpoint_dir), engine, world)
    elif carried is not None:
        engine.carry_over(carried)
    resumed_from = progress.step

    epochs = config.epochs_for(task_index)
    model.train()
    bar = _progress_bar(progress_bar and world.is_chief, total_steps, progress.step, task)
    done = False
    step_losses: list[float] = []
    while (epochs is None or progress.epoch < epochs) and not done:
        micro_batches = list(batches(shard_for_worker(examples, config, task_index, progress.epoch, world),
                                     config.train.micro_batch_size))
        for index in range(progress.micro_batch, len(micro_batches)):
            # This micro-batch's randomness (image augmentation, dropout) depends on where it sits
            # in the task, not on what ran before it: a task resumed from a checkpoint draws what an
            # uninterrupted one draws (the X-TAIL kill drill, tests/test_faults_services.py).
            torch.manual_seed(micro_batch_seed(config.run.seed, task_index, progress.epoch, index, world.rank))
            batch = _to_device(benchmark.collate(config, processor, task, micro_batches[index]), world.device)
            loss = engine.loss(batch)
            engine.backward(loss)
            step_losses.append(float(loss.detach()))
            progress.micro_batch = index + 1
            progress.samples += len(micro_batches[index]) * world.size
            if not engine.step():
                continue
            progress.step += 1
            progress.losses.append(_mean_over_workers(step_losses, world))
            step_losses = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{progress.losses[-1]:.4f}")
            if on_step is not None:
                on_step(progress)
            if on_checkpoint is not None and progress.step % config.train.checkpoint_every_steps == 0:
                on_checkpoint(progress, lambda folder: save_checkpoint(folder, model, engine, progress, world))
            if config.train.max_steps is not None and progress.step >= config.train.max_steps:
                done = True
                break
        else:
            progress.epoch += 1
            progress.micro_batch = 0
    if bar is not None:
        bar.close()
    if carry_to is not None and config.train.optimizer_across_tasks == "carry":
        write_carry(Path(carry_to), engine, world)

    sum_activation_stats(model, world)
    report = model.end_task()
    shard = model.export_shard()
    return TaskResult(task, task_index, shard, report, progress, time.perf_counter() - started, resumed_from)


def shard_for_worker(examples: list, config: JobConfig, task_index: int, epoch: int, world: World) -> list:
    """This worker's examples for an epoch: one seeded shuffle shared by all workers, dealt out
    round-robin and cut to equal length so every worker takes the same number of steps."""
    order = list(range(len(examples)))
    random.Random(config.run.seed * 1_000_003 + task_index * 1009 + epoch).shuffle(order)
    per_worker = len(order) // world.size
    mine = order[world.rank::world.size][:per_worker]
    return [examples[i] for i in mine]


def steps_per_task(config: JobConfig, task_index: int, num_examples: int, workers: int) -> int:
    """Optimizer steps the task will take (progress bars, learning-rate schedules)."""
    epochs = config.epochs_for(task_index)
    if epochs is None:
        return config.train.max_steps
    micro = -(-(num_examples // workers) // config.train.micro_batch_size)
    accumulate = config.train.global_batch_size // (config.train.micro_batch_size * workers)
    steps = max((micro * epochs) // accumulate, 1)
    return min(steps, config.train.max_steps) if config.train.max_steps else steps


# -- statistics over workers ---------------------------------------------------------------------
def sum_activation_stats(model: MoRAMModel, world: World) -> None:
    """Each worker saw its own tokens; pruning must see all of them, identically on every worker."""
    if world.size == 1 or not torch.distributed.is_initialized():
        return
    stats = model.activation_stats()  # the same layer order on every worker
    for name, local in stats.items():
        size = torch.tensor([local.numel()], device=world.device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        mass = torch.zeros(int(size.item()), device=world.device)
        mass[: local.numel()] = local.to(world.device)
        torch.distributed.all_reduce(mass)
        stats[name] = mass.cpu()
    model.set_activation_stats(stats)


def _mean_over_workers(losses: list[float], world: World) -> float:
    value = torch.tensor([sum(losses) / max(len(losses), 1)], device=world.device)
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= world.size
    return float(value.item())


# -- checkpoints inside a task (worker failures) -------------------------------------------------
def save_checkpoint(folder: Path, model: MoRAMModel, engine, progress: Progress, world: World) -> None:
    """This worker's part of a checkpoint: the chief writes the atoms (safetensors) and the
    progress (JSON); every worker writes its own optimizer state (tensors only)."""
    folder.mkdir(parents=True, exist_ok=True)
    if world.is_chief:
        save_file(model.open_task_state(), str(folder / ATOMS_FILE))
        (folder / STATE_FILE).write_text(json.dumps({**progress.__dict__, "world_size": world.size}))
    torch.save(engine.optimizer_state(), folder / f"optimizer-rank{world.rank}.pt")


@torch.no_grad()
def load_checkpoint_atoms(folder: Path, model: MoRAMModel, world: World) -> Progress:
    """The current block's atoms and statistics, and where training stood."""
    state = json.loads((folder / STATE_FILE).read_text())
    # statistics are summed over workers at the end: only one copy may carry the past
    model.load_open_task_state(load_file(str(folder / ATOMS_FILE)), with_stats=world.is_chief)
    state.pop("world_size")
    return Progress(**state)


def load_checkpoint_optimizer(folder: Path, engine, world: World) -> None:
    """This worker's optimizer moments and schedule, when the worker count is unchanged."""
    state = json.loads((folder / STATE_FILE).read_text())
    optimizer_file = folder / f"optimizer-rank{world.rank}.pt"
    if state["world_size"] != world.size or not optimizer_file.is_file():
        log.warning("optimizer state not restored (saved by %d workers, now %d); fresh moments",
                    state["world_size"], world.size)
        return
    engine.load_optimizer_state(torch.load(optimizer_file, weights_only=True, map_location=world.device))


# -- the optimizer carried across tasks (train.optimizer_across_tasks: carry) ---------------------
def carry_folders(config: JobConfig, run_id: str, task_index: int) -> dict[str, Path | None]:
    """``train_task``'s carry_from / carry_to for a task of run ``run_id``: folders under
    ``run.output_dir`` (absolute in a sequence), which every worker must reach."""
    root = Path(config.run.output_dir) / "carry" / run_id
    return {"carry_from": root / f"task-{task_index - 1}" if task_index else None,
            "carry_to": root / f"task-{task_index}"}


def carry_file(folder: Path, world: World) -> Path:
    return folder / f"optimizer-rank{world.rank}.pt"


def write_carry(folder: Path, engine, world: World) -> None:
    """This worker's optimizer at the end of a task (moments, steps, schedule, master values)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(engine.carry_state(), carry_file(folder, world))


def read_carry(config: JobConfig, task_index: int, folder: str | os.PathLike | None, world: World) -> dict | None:
    """The previous task's optimizer for task ``task_index``, or None (fresh): before any model
    loads, so a missing file stops the task at once."""
    if config.train.optimizer_across_tasks != "carry" or task_index == 0:
        return None
    path = None if folder is None else carry_file(Path(folder), world)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"train.optimizer_across_tasks: carry: task {task_index} continues the optimizer "
                                f"of task {task_index - 1}, but {path or 'no carry folder'} was not written "
                                f"(was task {task_index - 1} trained with carry, in this run folder?)")
    return torch.load(path, weights_only=True, map_location=world.device)


# -- helpers -------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def micro_batch_seed(seed: int, task_index: int, epoch: int, micro_batch: int, rank: int) -> int:
    """The torch seed of one micro-batch: distinct per task, epoch, micro-batch and worker."""
    key = f"{seed}/{task_index}/{epoch}/{micro_batch}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # torch takes < 2**63


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _single_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even alone: a one-process group on a free local port."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _progress_bar(enabled: bool, total_steps: int, done_steps: int, task: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=done_steps, desc=f"train {task}", unit="step", dynamic_ncols=True)
