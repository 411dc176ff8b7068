"""MoRAMLayer: a frozen base projection plus a growing bank of rank-1 atoms.

The bank holds the frozen atoms of every finished task (buffers, scale already baked into B)
and the current task's trainable block (parameters, scaled by alpha/r while it trains).
Routing (Eqs. 5-8) always runs over old and new atoms together; the baselines reuse the
same bank with other mixture weights, so every method runs on one code path.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from . import functional as MF
from .config import MoRAMConfig


@dataclass
class FinishedBlock:
    """The atoms one task added to one layer, as frozen (what a shard stores)."""

    A: torch.Tensor                 # [n, d_in]
    B: torch.Tensor                 # [d_out, n], scale baked in
    mass: torch.Tensor              # [n] activation mass of the kept atoms during the task
    routing_mass: torch.Tensor      # [R at the task] mass of every routed atom (heatmaps)
    kept: torch.Tensor              # [n] indices of the kept atoms in the task's block
    added: int                      # atoms the task trained (before pruning)
    router: torch.Tensor | None     # [1, d_in] MoE-LoRA gate key of the task's expert


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or transformers' GPT-2 Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and base.weight.dim() == 2:
        d_in, d_out = base.weight.shape  # Conv1D stores W as [in, out]: y = x @ W + b
        return d_in, d_out
    raise TypeError(f"MoRAM wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")


class MoRAMLayer(nn.Module):
    def __init__(self, base: nn.Module, config: MoRAMConfig, name: str = ""):
        super().__init__()
        self.base = base
        self.config = config
        self.name = name
        self.in_features, self.out_features = base_features(base)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Routing knobs; set_routing() changes them without touching the config object.
        self.k, self.tau, self.delta = config.k, config.tau, config.delta

        dtype = self._atom_dtype()
        device = base.weight.device
        self.register_buffer("frozen_A", torch.zeros(0, self.in_features, dtype=dtype, device=device))
        self.register_buffer("frozen_B", torch.zeros(self.out_features, 0, dtype=dtype, device=device))
        # MoE-LoRA: one gate key per frozen expert, and each frozen atom's expert index.
        self.register_buffer("frozen_router", torch.zeros(0, self.in_features, dtype=dtype, device=device))
        self.register_buffer("frozen_expert", torch.zeros(0, dtype=torch.long, device=device))

        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.router: nn.Parameter | None = None
        self.task_index = -1
        self.current_trained = False       # a block takes part in routing once it has trained
        self.last_finished: FinishedBlock | None = None

        # Statistics are plain attributes, not buffers: they must stay float32 when the model
        # is cast to bf16, and they never belong in a checkpoint of the weights.
        self.collect_stats = False
        self.token_mask: torch.Tensor | None = None
        self.activation_mass = torch.zeros(0)
        self.tokens_seen = 0

    # -- what the wrapped layer looks like from outside ------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _atom_dtype(self) -> torch.dtype:
        dtype = self.base.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @property
    def num_frozen(self) -> int:
        return self.frozen_A.shape[0]

    @property
    def num_current(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    @property
    def current_routes(self) -> bool:
        """Atoms never trained take no part in routing (DESIGN: growth and freezing)."""
        return self.A is not None and (self.current_trained or (self.training and torch.is_grad_enabled()))

    @property
    def num_routed(self) -> int:
        return self.num_frozen + (self.num_current if self.current_routes else 0)

    # -- task lifecycle --------------------------------------------------------------------
    def begin_task(self, task_index: int) -> None:
        """Append r fresh atoms (A kaiming-uniform a=√5, B zero); everything older stays frozen."""
        if self.A is not None:
            raise RuntimeError(f"{self.name}: begin_task() while task {self.task_index} is still open")
        self.task_index = task_index
        self.current_trained = False
        method = self.config.method
        if method == "seqlora" and self.num_frozen:
            self._thaw_all()  # one adapter trained on every task in turn
        else:
            self._new_block(task_index)
        self.reset_stats()

    def _new_block(self, task_index: int) -> None:
        r, device, dtype = self.config.r, self.frozen_A.device, self.frozen_A.dtype
        generator = torch.Generator().manual_seed(self._init_seed(task_index))
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        if self.config.method == "moelora":
            self.router = nn.Parameter(torch.zeros(1, self.in_features, device=device, dtype=dtype))

    def _thaw_all(self) -> None:
        self.A = nn.Parameter(self.frozen_A.clone())
        self.B = nn.Parameter(self.frozen_B / self.config.scale)
        self.frozen_A = self.frozen_A[:0].clone()
        self.frozen_B = self.frozen_B[:, :0].clone()
        self.current_trained = True  # it has trained already: it keeps routing

    def _init_seed(self, task_index: int) -> int:
        # Same atoms on every data-parallel worker; different atoms for every task and layer.
        return (self.config.seed * 1_000_003 + task_index * 7919 + zlib.crc32(self.name.encode())) % (2**63)

    @torch.no_grad()
    def end_task(self, prune_mass: float | None) -> FinishedBlock:
        """Freeze the current block with the scale baked into B, pruning it first if asked."""
        if self.A is None:
            raise RuntimeError(f"{self.name}: end_task() without begin_task()")
        added = self.num_current
        mass = self._current_mass()
        keep = torch.arange(added)
        if prune_mass is not None and self.config.method == "moram" and self.current_trained:
            keep = MF.atoms_to_keep(mass, prune_mass)
        device = self.A.device
        A = self.A.detach()[keep.to(device)].clone()
        B = (self.B.detach() * self.config.scale)[:, keep.to(device)].clone()
        router = None if self.router is None else self.router.detach().clone()
        self.last_finished = FinishedBlock(
            A=A, B=B, mass=mass[keep].clone(), routing_mass=self.activation_mass.clone(),
            kept=keep.clone(), added=added, router=router,
        )
        self.append_frozen(A, B, router)
        self.A = self.B = self.router = None
        self.current_trained = False
        return self.last_finished

    def _current_mass(self) -> torch.Tensor:
        mass = self.activation_mass
        if mass.numel() < self.num_frozen + self.num_current:
            return torch.zeros(self.num_current)
        return mass[self.num_frozen:].clone()

    @torch.no_grad()
    def append_frozen(self, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor | None = None) -> None:
        dtype, device = self.frozen_A.dtype, self.frozen_A.device
        self.frozen_A = torch.cat([self.frozen_A, A.to(device=device, dtype=dtype)])
        self.frozen_B = torch.cat([self.frozen_B, B.to(device=device, dtype=dtype)], dim=1)
        if router is not None:
            expert = self.frozen_router.shape[0]
            self.frozen_router = torch.cat([self.frozen_router, router.to(device=device, dtype=dtype)])
            tags = torch.full((A.shape[0],), expert, dtype=torch.long, device=device)
            self.frozen_expert = torch.cat([self.frozen_expert, tags])

    @torch.no_grad()
    def clear_frozen(self) -> None:
        self.frozen_A = self.frozen_A[:0].clone()
        self.frozen_B = self.frozen_B[:, :0].clone()
        self.frozen_router = self.frozen_router[:0].clone()
        self.frozen_expert = self.frozen_expert[:0].clone()

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.activation_mass = torch.zeros(0)
        self.tokens_seen = 0

    def _accumulate(self, w: torch.Tensor, x: torch.Tensor) -> None:
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = None  # a layer that does not see [batch, seq] tokens
        mass = MF.activation_mass(w, mask).cpu()
        if self.activation_mass.numel() < mass.numel():  # the current block joined routing
            grown = torch.zeros(mass.numel())
            grown[: self.activation_mass.numel()] = self.activation_mass
            self.activation_mass = grown
        self.activation_mass[: mass.numel()] += mass
        self.tokens_seen += int(mask.sum()) if mask is not None else x[..., 0].numel()

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        current = self.current_routes
        if self.training and current and torch.is_grad_enabled():
            self.current_trained = True
        if self.num_frozen + (self.num_current if current else 0) == 0:
            return y
        A, B = self.frozen_A, self.frozen_B
        if current:
            A = torch.cat([A, self.A])
            B = torch.cat([B, self.B * self.config.scale], dim=1)
        x_atoms = self.dropout(x).to(A.dtype)
        h = x_atoms @ A.t()                                          # Eq. 3
        w = self.mixture_weights(h, x_atoms, current)
        if self.collect_stats:
            self._accumulate(h.new_ones(h.shape) if w is None else w, x)
        mixed = h if w is None else w * h                            # Eq. 4: w ⊙ h
        return y + (mixed @ B.t()).to(y.dtype)

    def mixture_weights(self, h: torch.Tensor, x: torch.Tensor, current: bool) -> torch.Tensor | None:
        """w over the routed atoms; None means every atom counts fully (the LoRA baselines)."""
        method = self.config.method
        if method == "moram":
            delta = None if self.training else self.delta
            return MF.route(h, self.k, self.tau, delta, self.config.eps)   # Eqs. 5-8
        if method == "moelora":
            keys, expert = self.frozen_router, self.frozen_expert
            if current:
                keys = torch.cat([keys, self.router])
                new = torch.full((self.num_current,), keys.shape[0] - 1, dtype=torch.long, device=h.device)
                expert = torch.cat([expert, new])
            gate = torch.softmax((x @ keys.t()).float(), dim=-1)     # learned router over experts
            return gate[..., expert].to(h.dtype)
        return None  # seqlora / inclora: a plain sum of rank-r adapters

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, frozen_atoms={self.num_frozen}, "
                f"current_atoms={self.num_current}, method={self.config.method}")
