"""Optimisation engines for one task's atoms: DeepSpeed (the platform default) or plain PyTorch.

Both expose the same three calls, so the training loop is written once:

    engine = build_engine(model, config.train, world_size, device)
    loss = engine.loss(batch)      # forward on one micro-batch, plus the method's extra loss
    engine.backward(loss)          # gradient accumulation handled inside
    engine.step()                  # optimizer step at accumulation boundaries

Each task gets a new engine: fresh optimizer state for fresh atoms (DESIGN: growth). With
``train.optimizer_across_tasks: carry`` an engine instead continues the previous task's
optimizer as the official TRACE code does (``carry_state`` / ``carry_over``; docs/parity.md M2).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from moram import MoRAMModel

from .config import TrainSection

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def accumulation_steps(train: TrainSection, world_size: int) -> int:
    return train.global_batch_size // (train.micro_batch_size * world_size)


def deepspeed_config(train: TrainSection, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(train, world_size),
        "train_batch_size": train.global_batch_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


def _optimizer(params: list[nn.Parameter], train: TrainSection) -> torch.optim.Optimizer:
    # The reference: Adam(0.9, 0.95), constant lr; AdamW with weight_decay=0 is the same update.
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 0 at ``total_steps`` (one per optimizer step)."""
    warmup = train.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.lr_schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_extra_loss(loss: torch.Tensor, model: MoRAMModel) -> torch.Tensor:
    """The benchmark's loss plus the method's own term (O-LoRA's orthogonality loss; nothing
    for the other methods), computed outside autocast in the atoms' precision."""
    extra = model.extra_loss()
    if not extra.requires_grad:  # a method without an extra term: the loss stays bit-identical
        return loss
    return loss + extra.to(loss.device)


class CarriedOptimizer:
    """The previous task's optimizer continued, as the official TRACE code continues it.

    That code builds one Adam and one DeepSpeed ZeRO-2 engine for the whole sequence and
    re-initialises a task's new block in place in the model's (bf16) weights only; ZeRO's fp32
    master copies keep the previous task's trained values and are written back over the model's
    weights at the first optimizer step (docs/parity.md, row M2). So here: the moments, step
    counts and schedule position are loaded when the engine is built; the master values are
    written into the optimizer's own parameter tensors right before the first optimizer step,
    after the first accumulation window has computed its gradients on the fresh atoms.
    """

    def __init__(self):
        self.pending_master: list[torch.Tensor] | None = None

    @staticmethod
    def state(optimizer: torch.optim.Optimizer, scheduler, world_size: int) -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "world_size": world_size,
                "master": [p.detach().float().cpu().clone() for p in _own_params(optimizer)]}

    def load(self, optimizer: torch.optim.Optimizer, scheduler, world_size: int, carried: dict) -> None:
        mine = [tuple(p.shape) for p in _own_params(optimizer)]
        theirs = [tuple(t.shape) for t in carried["master"]]
        if carried["world_size"] != world_size or mine != theirs:
            raise ValueError(f"train.optimizer_across_tasks: the carried optimizer state does not fit this task's "
                             f"(saved by {carried['world_size']} workers for tensors {theirs}; now {world_size} "
                             f"workers, tensors {mine})")
        optimizer.load_state_dict(carried["optimizer"])
        scheduler.load_state_dict(carried["scheduler"])
        self.pending_master = carried["master"]

    @torch.no_grad()
    def before_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.pending_master is None:
            return
        for param, value in zip(_own_params(optimizer), self.pending_master):
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        self.pending_master = None


def _own_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors the optimizer updates: ZeRO's flat fp32 partitions, or the model's parameters."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class DeepSpeedEngine:
    """DeepSpeed ZeRO over the trainable atoms (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: MoRAMModel, loss_fn: LossFn, train: TrainSection, world_size: int, total_steps: int):
        import deepspeed

        self.model = model

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params,
            lr_scheduler=lr_schedule(optimizer, train, total_steps),
            config=deepspeed_config(train, world_size), dist_init_required=False)
        self.loss_fn = loss_fn
        self.dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
        self.world_size, self.carried = world_size, CarriedOptimizer()

    def loss(self, batch: dict) -> torch.Tensor:
        return with_extra_loss(self.loss_fn(self.engine, batch), self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Returns True when this call completed an optimizer step."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.carried.before_first_step(_innermost(self.optimizer))
        self.engine.step()
        return boundary

    def optimizer_state(self) -> dict:
        # The torch optimizer inside DeepSpeed's wrapper: moments of this worker's partition as
        # plain tensors (the wrapper's own state holds Python objects that weights_only refuses).
        return {"optimizer": _innermost(self.optimizer).state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        _innermost(self.optimizer).load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def carry_state(self) -> dict:
        """What the next task continues with (``carry_over``): this worker's part."""
        return CarriedOptimizer.state(_innermost(self.optimizer), self.scheduler, self.world_size)

    def carry_over(self, carried: dict) -> None:
        self.carried.load(_innermost(self.optimizer), self.scheduler, self.world_size, carried)


def _innermost(optimizer) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class TorchEngine:
    """Plain PyTorch: one process (a lone GPU box, a notebook) or DDP when a process group exists."""

    def __init__(self, model: MoRAMModel, loss_fn: LossFn, train: TrainSection, world_size: int, total_steps: int):
        self.model = model
        if world_size > 1 and torch.distributed.is_initialized():
            model = nn.parallel.DistributedDataParallel(model)
        self.forward_model = model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.params, train)
        self.scheduler = lr_schedule(self.optimizer, train, total_steps)
        self.loss_fn = loss_fn
        self.grad_clip = train.grad_clip
        self.accumulate = accumulation_steps(train, world_size)
        self.micro_step = 0
        self.autocast = train.precision == "bf16"
        self.world_size, self.carried = world_size, CarriedOptimizer()

    def loss(self, batch: dict) -> torch.Tensor:
        device = self.params[0].device.type if self.params else "cpu"
        context = torch.autocast(device, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with context:
            loss = self.loss_fn(self.forward_model, batch)
        return with_extra_loss(loss, self.model)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulate).backward()

    def step(self) -> bool:
        self.micro_step += 1
        if self.micro_step % self.accumulate:
            return False
        self.carried.before_first_step(self.optimizer)  # no master copies: the parameters themselves
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def carry_state(self) -> dict:
        return CarriedOptimizer.state(self.optimizer, self.scheduler, self.world_size)

    def carry_over(self, carried: dict) -> None:
        self.carried.load(self.optimizer, self.scheduler, self.world_size, carried)


def build_engine(model: MoRAMModel, loss_fn: LossFn, train: TrainSection, world_size: int, total_steps: int):
    engine = DeepSpeedEngine if train.engine == "deepspeed" else TorchEngine
    return engine(model, loss_fn, train, world_size, total_steps)
