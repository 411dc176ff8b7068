"""The value projection Δy = B · (w ⊙ h) using only the top-k atoms each token kept.

With k_eff nonzero coefficients per token, the dense product [tokens, R] x [R, d_out] spends
R/k_eff of its work on zeros. ``sparse_value`` instead sums the k_eff selected value columns
per token, weighted by their coefficients, with ``F.embedding_bag(mode="sum",
per_sample_weights=...)``: one pass, no [tokens, k, d_out] gather, gradients for both the
coefficients and B. For a small bank the dense product is faster (one GEMM beats the per-row
gathers), so it switches to dense below a threshold measured on CPU (docs/performance.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Use the sparse path when R >= SPARSE_MIN_ATOMS_PER_K * k_eff. Measured on CPU (bench/
# layer_bench.py --value-only, d = 768 and 2048, 512 tokens, k = 16, float32): see
# docs/performance.md for the table this comes from.
SPARSE_MIN_ATOMS_PER_K = 4


def dense_value(coef: torch.Tensor, idx: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Reference: add the kept coefficients into [..., R] (a repeated index sums) and multiply by B^T."""
    mixed = coef.new_zeros(*coef.shape[:-1], B.shape[1]).scatter_add(-1, idx, coef)
    return mixed @ B.t()


def sparse_value(
    coef: torch.Tensor,
    idx: torch.Tensor,
    B: torch.Tensor,
    *,
    min_atoms_per_k: float = SPARSE_MIN_ATOMS_PER_K,
) -> torch.Tensor:
    """Δy [..., d_out] = Σ_j coef[..., j] · B[:, idx[..., j]].

    coef [..., k] (the kept w ⊙ h, e.g. from fused_route_topk), idx [..., k] (int64 atom
    indices), B [d_out, R] (the value columns). Differentiable in coef and B; the result has
    B's dtype (coef is cast to it, as the dense product would). Dense when R < min_atoms_per_k · k.
    """
    d_out, n_atoms = B.shape
    k = idx.shape[-1]
    if idx.shape != coef.shape:
        raise ValueError(f"coef {tuple(coef.shape)} and idx {tuple(idx.shape)} must have the same shape")
    coef = coef.to(B.dtype)
    if k == 0 or n_atoms == 0:
        return coef.new_zeros(*coef.shape[:-1], d_out)
    if n_atoms < min_atoms_per_k * k:
        return dense_value(coef, idx, B)
    rows = F.embedding_bag(idx.reshape(-1, k), B.t(), per_sample_weights=coef.reshape(-1, k), mode="sum")
    return rows.view(*coef.shape[:-1], d_out)
