"""The continual-learning methods as small strategies over one atom-bank layer.

Every method shares ``MoRAMLayer``'s bank (frozen atoms + the current task's block); a
strategy owns what differs between them, as PEFT's ``LoraVariant`` owns a LoRA variant's
forward (a stateful method is one class here plus its config fields):

    begin_task(layer, i)          how task i's trainable block is made (fresh atoms, or thaw all)
    mixture_weights(layer, ...)   w over the routed atoms; None = every atom counts fully
    update(layer, h, x, y, ...)   the fast path's y + Δy from the key responses h (default: w from
                                  mixture_weights, then the dense value; MoRAM: compact routing)
    trains_fused(x)               whether the open block trains through training_update here
    training_update(layer, x, y)  y + Δy from the input itself, one fused step (MoRAM, on CPU)
    task_tensors                  tensors it trains per task beside A and B (``TaskTensor``); the
                                  layer, the open task's state, shards and loading carry them
    routes                        whether it has routing weights (routing diagnostics)
    prunes                        whether post-pruning (Sec. 3.3.4) applies to a task's atoms
    shard_mode                    "append": a task's shard joins the bank; "replace": it is the bank
    extra_loss(layer)             a regulariser added to the task loss (None: none)

``METHODS`` maps a config's ``method`` name to its strategy class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from . import functional as MF
from . import kernels

if TYPE_CHECKING:
    from .layer import MoRAMLayer


@dataclass(frozen=True)
class TaskTensor:
    """A tensor a method trains per task beside the atoms' A and B: ``rows`` x d_in per task
    (MoE-LoRA's gate key: one row). The layer carries it without knowing the method: the open
    block's parameter ``layer.<name>`` (zeros at begin_task), the rows of every finished task in
    order in ``layer.frozen_<name>`` with ``layer.frozen_block`` naming each frozen atom's task,
    the shard field ``layers.<module>.<name>`` and ``<layer>.<name>`` in the open task's state."""

    name: str
    rows: int = 1


class Method:
    """Defaults shared by the methods: a new rank-r block per task, plain sum, no pruning."""

    name: ClassVar[str] = ""
    # alpha = default_scale * r when a config sets none: 4 for the LoRA baselines, the official
    # TRACE baselines' LoraConfig(r=8, lora_alpha=32) (Artificer-AI-Lab/MoRAM TRACE/training/
    # main.py:359 O-LoRA, :497 SeqLoRA; IncLoRA and MoE-LoRA, absent there, as their family).
    default_scale: ClassVar[float] = 4.0
    prunes: ClassVar[bool] = False
    routes: ClassVar[bool] = False
    shard_mode: ClassVar[str] = "append"
    task_tensors: ClassVar[tuple[TaskTensor, ...]] = ()
    # whether its eval update over a frozen bank is kernels.route_value (the layer's serving plan)
    serves_with_route_value: ClassVar[bool] = False

    def begin_task(self, layer: "MoRAMLayer", task_index: int) -> None:
        layer.new_block(task_index)

    def mixture_weights(self, layer: "MoRAMLayer", h: torch.Tensor, x: torch.Tensor,
                        current: bool) -> torch.Tensor | None:
        return None

    def update(self, layer: "MoRAMLayer", h: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               current: bool) -> torch.Tensor:
        """The fast path's y + Δy: h [..., R] the key responses of the routed atoms (frozen, then
        the open block's when ``current``), x the layer input after dropout, y the base output."""
        w = self.mixture_weights(layer, h, x, current)
        if layer.collect_stats:
            layer.accumulate(h.new_ones(h.shape) if w is None else w, x)
        return layer.dense_update(h if w is None else w * h, current, y)

    def trains_fused(self, x: torch.Tensor) -> bool:
        """Whether the open block trains through ``training_update`` for this input (else the key
        responses, then ``update``)."""
        return False

    def training_update(self, layer: "MoRAMLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + Δy from x (after dropout) in one fused step while the open block trains."""
        raise NotImplementedError(f"{self.name} has no fused training update")

    def extra_loss(self, layer: "MoRAMLayer") -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return type(self).__name__


class MoRAM(Method):
    """Rank-1 atoms routed by normalised key response, top-k and a tempered softmax (Eqs. 5-8)."""

    name = "moram"
    serves_with_route_value = True
    default_scale = 2.0     # alpha = 2r: the official MoRAM's lora_alpha (training/main.py:409)
    prunes = True
    routes = True

    def mixture_weights(self, layer, h, x, current):
        delta = None if layer.training else layer.delta      # Eq. 8 acts at inference only
        return MF.route(h, layer.k, layer.tau, delta, layer.config.eps)

    def trains_fused(self, x):
        return kernels.uses_training_update(x)

    def training_update(self, layer, x, y):
        """Eqs. 3-7 while the open block trains, as one autograd function (``kernels.training_update``:
        one key GEMM over [A_frozen; A], the routing's backward written out)."""
        out, idx, w = kernels.training_update(x, y, layer.frozen_A, layer.A, layer.frozen_values,
                                              layer.current_values(), layer.k, layer.tau, layer.config.eps)
        if layer.collect_stats:
            layer.accumulate_kept(idx, w, layer.num_frozen + layer.num_current, x)
        return out

    def update(self, layer, h, x, y, current):
        """Eqs. 5-8 keeping only the k_eff atoms of each token, then the value of those. At
        inference over the frozen bank on CPU: one call, ``kernels.route_value`` (routing, value
        and residual: the C++ op)."""
        delta = None if layer.training else layer.delta      # Eq. 8 acts at inference only
        # (elsewhere, e.g. on CUDA, the Triton routing below serves inference as well)
        if not current and not (torch.is_grad_enabled() and h.requires_grad) and kernels.uses_cpu_op(h):
            if layer.collect_stats:  # the weights for the statistics only: the output is route_value's
                _, idx, w = kernels.fused_route_topk(h, layer.k, layer.tau, delta, layer.config.eps,
                                                     return_weights=True, ascending=False)
                layer.accumulate_kept(idx, w, h.shape[-1], x)
            return kernels.route_value(y, h, layer.frozen_values, layer.k, layer.tau, delta, layer.config.eps)
        routed = kernels.fused_route_topk(h, layer.k, layer.tau, delta, layer.config.eps,
                                          return_weights=layer.collect_stats, ascending=False)
        coef, idx = routed[0], routed[1]
        if layer.collect_stats:
            layer.accumulate_kept(idx, routed[2], h.shape[-1], x)
        n_atoms, k_eff = h.shape[-1], idx.shape[-1]
        # The switch points are measured (docs/performance.md), later where a backward follows.
        per_k = kernels.SPARSE_MIN_ATOMS_PER_K_TRAINING if h.requires_grad else kernels.SPARSE_MIN_ATOMS_PER_K
        current_B = layer.current_values() if current else None
        if n_atoms >= per_k * k_eff:
            value = kernels.sparse_value(coef, idx, layer.frozen_values.t(), current_B, min_atoms_per_k=0)
            return layer.add_residual(y, value)
        # Small bank: one dense product beats per-atom lookups. With k_eff = R the kept
        # coefficients are already every atom's, in order (indices 0..R-1).
        mixed = coef if k_eff == n_atoms else coef.new_zeros(h.shape).scatter_add(-1, idx, coef)
        return layer.dense_update(mixed, current, y)


class SeqLoRA(Method):
    """One rank-r adapter trained on every task in turn: later tasks thaw the whole bank."""

    name = "seqlora"
    shard_mode = "replace"

    def begin_task(self, layer, task_index):
        if layer.num_frozen:
            layer.thaw_all()
        else:
            layer.new_block(task_index)


class IncLoRA(Method):
    """A new dense rank-r adapter per task; older adapters frozen; all summed."""

    name = "inclora"


class MoELoRA(Method):
    """A rank-r expert per task, mixed by a learned router (one gate key per expert).

    gate = softmax(top-k(x · keys) / moe_tau) over the experts; every atom of an expert gets
    its expert's gate. moe_top_k=None keeps all experts and moe_tau=1 is the plain softmax.
    """

    name = "moelora"
    routes = True
    task_tensors = (TaskTensor("router"),)   # the task expert's gate key [1, d_in], zeros at first

    def mixture_weights(self, layer, h, x, current):
        keys, expert = layer.frozen_router, layer.frozen_block   # one expert per finished task
        if current:
            keys = torch.cat([keys, layer.router])
            new = torch.full((layer.num_current,), keys.shape[0] - 1, dtype=torch.long, device=h.device)
            expert = torch.cat([expert, new])
        logits = (x @ keys.t()).float()
        if layer.config.moe_top_k is not None:
            logits = MF.keep_top_k(logits, layer.config.moe_top_k)
        gate = torch.softmax(logits / layer.config.moe_tau, dim=-1)
        return gate[..., expert].to(h.dtype)


class OLoRA(IncLoRA):
    """O-LoRA (Wang et al. 2023): IncLoRA plus a loss keeping the new adapter's subspace
    orthogonal to the old ones, as the official TRACE code computes it
    (Artificer-AI-Lab/MoRAM, TRACE/model/Regular/O_LoRA.py:64-79):

        loss += λ1 · Σ_layers Σ_ij |A_old · A_newᵀ|_ij            (L1 of the product, line 69)
              + λ2 · Σ_layers (||A_new||_F + ||B_new||_F)         (line 76: torch.norm(p=2) of
                                                                  every loranew_ parameter, A
                                                                  and B, not squared)

    A_old is every frozen A of the layer (the official ``lora_A``, r_sum x d_in). The issue
    text asked for λ2·||A_new||²; the official term above (unsquared, A and B) is what this is.
    The defaults λ1 = 0.5, λ2 = 0 are the official ones: the argparse defaults --orth_lambda1/2
    of TRACE/training/main.py:232-239 (also O_LoRA.py:16); no runner script overrides them.
    """

    name = "olora"

    def extra_loss(self, layer):
        if layer.A is None:
            return None
        config = layer.config
        orthogonality = (layer.frozen_A @ layer.A.t()).abs().sum()
        loss = config.olora_lambda1 * orthogonality
        if config.olora_lambda2:
            loss = loss + config.olora_lambda2 * (torch.linalg.norm(layer.A) + torch.linalg.norm(layer.B))
        return loss


METHODS: dict[str, type[Method]] = {m.name: m for m in (MoRAM, SeqLoRA, IncLoRA, MoELoRA, OLoRA)}


def method_for(name: str) -> Method:
    """The strategy object for a config's ``method`` name."""
    return METHODS[name]()
