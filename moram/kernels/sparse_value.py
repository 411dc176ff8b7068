"""The value projection Δy = B · (w ⊙ h) using only the top-k atoms each token kept.

With k_eff nonzero coefficients per token, the dense product [tokens, R] x [R, d_out] spends
R/k_eff of its work on zeros. ``sparse_value`` instead sums the k_eff selected value columns
per token, weighted by their coefficients, with ``F.embedding_bag(mode="sum",
per_sample_weights=...)``: one pass, no [tokens, k, d_out] gather, gradients for both the
coefficients and the bank. For a small bank the dense product is faster (one GEMM beats the
per-row lookups), so it switches to dense below a threshold measured on CPU (docs/performance.md).

The bank comes in two parts, as the layer holds it: the frozen columns ``B`` (no gradient
needed) and, optionally, the trainable block ``current_B`` whose atoms are numbered after B's.
The trainable block goes through a small dense product (as a LoRA's B does), so the backward
never builds a gradient for the whole bank.

embedding_bag reads the bank as rows [R, d_out]; from a strided view (B.t() of a [d_out, R] B)
it is an order of magnitude slower on CPU, so B.t() is made contiguous first (a copy of the
bank per call). A bank stored as rows [R, d_out] and passed as its view ``rows.t()`` skips the copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Use the sparse path when R >= SPARSE_MIN_ATOMS_PER_K * k_eff. Measured on CPU (python
# bench/layer_bench.py --section value; d = 768 and 2048, 512 tokens, k = 16, float32, the last
# 16 atoms trainable): sparse wins the forward from R ~ 4-6 k and forward+backward from R ~ 6-8 k;
# at 8 k it won both at both widths. docs/performance.md has the table.
SPARSE_MIN_ATOMS_PER_K = 8
# With a backward to run (training), since the layer fuses the dense value into addmm's onto the
# base output, the dense path stays faster for longer: at k = 8, 1024 tokens, d_in = 576 the
# sparse forward+backward was 1.24 / 1.09 / 1.00x the dense one at R = 64 / 128 / 256 for
# d_out = 576, and 1.04 / 0.95 / 0.94x for d_out = 192 (docs/performance.md): sparse from 24 k.
SPARSE_MIN_ATOMS_PER_K_TRAINING = 24


def dense_value(coef: torch.Tensor, idx: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Reference: add the kept coefficients into [..., R] (a repeated index sums) and multiply by B^T."""
    mixed = coef.new_zeros(*coef.shape[:-1], B.shape[1]).scatter_add(-1, idx, coef)
    return mixed @ B.t()


def _rows(B: torch.Tensor) -> torch.Tensor:
    rows = B.t()
    return rows if rows.is_contiguous() else rows.contiguous()


def sparse_value(
    coef: torch.Tensor,
    idx: torch.Tensor,
    B: torch.Tensor,
    current_B: torch.Tensor | None = None,
    *,
    min_atoms_per_k: float = SPARSE_MIN_ATOMS_PER_K,
) -> torch.Tensor:
    """Δy [..., d_out] = Σ_j coef[..., j] · bank[:, idx[..., j]], bank = [B | current_B].

    coef [..., k] (the kept w ⊙ h, e.g. from fused_route_topk), idx [..., k] (int64 atom
    indices into the bank), B [d_out, R_frozen], current_B [d_out, r] or None. Differentiable in
    coef, B and current_B; the result has B's dtype (coef is cast to it, as the dense product
    would). Dense when R < min_atoms_per_k · k.
    """
    if idx.shape != coef.shape:
        raise ValueError(f"coef {tuple(coef.shape)} and idx {tuple(idx.shape)} must have the same shape")
    d_out, n_frozen = B.shape
    n_current = 0 if current_B is None else current_B.shape[1]
    k = idx.shape[-1]
    coef = coef.to(B.dtype)
    if k == 0 or n_frozen + n_current == 0:
        return coef.new_zeros(*coef.shape[:-1], d_out)
    if n_frozen + n_current < min_atoms_per_k * k:
        bank = B if current_B is None else torch.cat([B, current_B.to(B.dtype)], dim=1)
        return dense_value(coef, idx, bank)
    if current_B is None:
        return _embedding_sum(coef, idx, B)
    in_current = idx >= n_frozen
    frozen_part = _embedding_sum(coef.masked_fill(in_current, 0), idx.clamp(max=max(n_frozen - 1, 0)), B)
    current_coef = coef.masked_fill(~in_current, 0)
    current_mixed = coef.new_zeros(*coef.shape[:-1], n_current).scatter_add(
        -1, (idx - n_frozen).clamp(min=0), current_coef)
    # in place into the embedding_bag output (its backward does not need it): no second [.., d_out] buffer
    return frozen_part.view(-1, d_out).addmm_(current_mixed.view(-1, n_current), current_B.to(B.dtype).t()).view(
        frozen_part.shape)


def _embedding_sum(coef: torch.Tensor, idx: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    k, d_out = idx.shape[-1], B.shape[0]
    if B.shape[1] == 0:
        return coef.new_zeros(*coef.shape[:-1], d_out)
    out = F.embedding_bag(idx.reshape(-1, k), _rows(B), per_sample_weights=coef.reshape(-1, k), mode="sum")
    return out.view(*coef.shape[:-1], d_out)
