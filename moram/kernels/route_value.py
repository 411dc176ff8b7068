"""MoRAM's inference update in one call: routing (Eqs. 5-8), the value of the kept atoms and the
residual add, y + Δy from the base output y and the key responses h.

``route_value`` runs the C++ op (csrc/route_value.cpp, built at ``make install``; ``cpu_op``) on
CPU where it is built, else ``route_value_reference``: the same arithmetic in PyTorch (compact
routing, then the value from the kept atoms). Inference only: no autograd, no statistics, the
frozen bank only (the layer routes an open block, or collects statistics, through the training
path). Both are tested against moram.functional.
"""
from __future__ import annotations

import torch

from .. import functional as MF
from . import cpu_op
from .routing import route_topk_reference
from .sparse_value import SPARSE_MIN_ATOMS_PER_K, dense_value


def route_value_reference(y: torch.Tensor, h: torch.Tensor, values: torch.Tensor, k: int, tau: float,
                          delta: float | None = None, eps: float = MF.DEFAULT_EPS) -> torch.Tensor:
    """y + Σ_kept (w ⊙ h)_j · values[j]; y [..., d_out], h [..., R], values [R, d_out] (rows)."""
    if h.shape[-1] == 0:
        return y.clone()
    coef, idx = route_topk_reference(h, k, tau, delta, eps, ascending=False)
    if h.shape[-1] >= SPARSE_MIN_ATOMS_PER_K * idx.shape[-1]:
        rows = torch.nn.functional.embedding_bag(idx.reshape(-1, idx.shape[-1]), values,
                                                 per_sample_weights=coef.reshape(-1, idx.shape[-1]), mode="sum")
        return y + rows.view(y.shape).to(y.dtype)
    return y + dense_value(coef, idx, values.t()).to(y.dtype)


def uses_cpu_op(h: torch.Tensor) -> bool:
    """Whether route_value() runs the C++ op for these responses (CPU, a built op, float dtype)."""
    return h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16, torch.float16) and cpu_op.available()


def route_value(y: torch.Tensor, h: torch.Tensor, values: torch.Tensor, k: int, tau: float,
                delta: float | None = None, eps: float = MF.DEFAULT_EPS) -> torch.Tensor:
    """y + Δy [..., d_out] (a fresh tensor), Δy = Σ over each token's k_eff kept atoms of
    (w ⊙ h)_j · values[j] (Eqs. 4-8). No autograd: call it under no_grad / inference_mode."""
    if h.shape[-1] == 0 or not uses_cpu_op(h) or y.dtype != h.dtype or values.dtype != h.dtype:
        return route_value_reference(y, h, values, k, tau, delta, eps)
    k_eff = MF.effective_k(k, h.shape[-1])
    out = cpu_op.build().route_value(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), values.contiguous(),
                                     k_eff, float(tau), float(delta) if delta else 0.0, float(eps))
    return out.view(y.shape)
