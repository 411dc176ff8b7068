"""MoRAM as equations.

A layer owns a bank of R rank-1 atoms: keys ``A`` (R x d_in, a row per atom) and values
``B`` (d_out x R, a column per atom). For a token x (paper, Sec. 3):

    h = A · dropout(x)                       key response per atom              (Eq. 3)
    s = h / max(||h||_2, eps)                L2 over the atoms, per token       (Eq. 5)
    keep the k largest signed s_i, k_eff = min(max(k, 2), R); others -> -inf    (Eq. 6)
    w = softmax(s_masked / tau)                                                 (Eq. 7)
    inference only, delta > 0:  w_i <- w_i * 1[s_i >= delta], no renormalisation (Eq. 8)
    y = W0 x + b + B · (w ⊙ h)               the weight multiplies the raw h    (Eq. 4)

Everything here works for any leading shape ([..., d_in] tokens, [..., R] responses),
in float32 and bfloat16, on CPU and CUDA, and is differentiable.
"""
from __future__ import annotations

import torch

DEFAULT_EPS = 1e-6


def effective_k(k: int, num_atoms: int) -> int:
    """k_eff = min(max(k, 2), R): a mixture of at least two atoms, at most all of them."""
    return min(max(int(k), 2), num_atoms)


def normalized_scores(h: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Eq. 5: each atom's relevance, the key response L2-normalised over the atoms.

    Computed in at least float32 (bf16/fp16 responses are upcast; float64 stays float64)."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    return h / h.norm(dim=-1, keepdim=True).clamp_min(eps)


def top_k_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 6: keep the k_eff largest *signed* scores, set the rest to -inf.

    Ties at the k-th value are broken by ``torch.topk`` so exactly k_eff atoms survive.
    """
    k_eff = effective_k(k, s.shape[-1])
    if k_eff >= s.shape[-1]:
        return s
    kept = s.topk(k_eff, dim=-1).indices
    masked = torch.full_like(s, float("-inf"))
    return masked.scatter(-1, kept, s.gather(-1, kept))


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits (k >= 1, no floor), set the rest to -inf; all when k >= n.

    MoE-LoRA's expert gate (moe_top_k); MoRAM's own top-k is ``top_k_mask`` (k_eff >= 2)."""
    if k >= logits.shape[-1]:
        return logits
    kept = logits.topk(k, dim=-1).indices
    return torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))


def route(
    h: torch.Tensor,
    k: int,
    tau: float,
    delta: float | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Mixture weights w [..., R] from raw key responses h = A·x [..., R] (Eqs. 5-8).

    The softmax runs in float32 whatever h's dtype; the result has h's dtype.
    ``delta`` (Eq. 8) is applied only when it is given and > 0: pass it at inference only.
    """
    if h.shape[-1] == 0:
        return h
    s = normalized_scores(h, eps)                                   # Eq. 5
    w = torch.softmax(top_k_mask(s, k) / tau, dim=-1)               # Eqs. 6-7
    if delta is not None and delta > 0:
        w = w * (s >= delta)                                        # Eq. 8, no renormalisation
    return w.to(h.dtype)


def moram_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    k: int,
    tau: float,
    delta: float | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """The MoRAM update Δy = B · (w ⊙ h) with h = A·x (Eqs. 3-4); x [..., d_in] -> [..., d_out]."""
    h = x @ A.t()                                                   # Eq. 3
    w = route(h, k, tau, delta, eps)
    return (w * h) @ B.t()                                          # Eq. 4


def activation_mass(w: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """m_i = Σ_tokens w_i (paper Sec. 3.3.4): how much routing weight each atom received.

    ``token_mask`` [...] (1 = real token) keeps padding out of the statistics.
    """
    w = w.detach().float()
    if token_mask is not None:
        w = w * token_mask.to(w.dtype).unsqueeze(-1)
    return w.reshape(-1, w.shape[-1]).sum(0)


def atoms_to_keep(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """Post-pruning (Sec. 3.3.4, App. C.5): the smallest set of atoms covering >= ``coverage``
    of the total activation mass. Returns the kept indices in their original order."""
    if mass.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    total = mass.sum()
    if total <= 0:
        return torch.arange(mass.numel())  # no evidence either way: keep everything
    order = mass.argsort(descending=True, stable=True)
    covered = mass[order].cumsum(0) / total
    # Count of atoms needed: first position whose running share reaches the target.
    needed = int((covered < coverage - 1e-12).sum().item()) + 1
    return order[: min(needed, mass.numel())].sort().values
