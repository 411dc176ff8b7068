"""Fast routing entry points: the mixed coefficients w ⊙ h that the value projection consumes.

``fused_route_mix`` gives them dense ([..., R], zeros outside the top-k), ``fused_route_topk``
compact (the k_eff kept coefficients and their atom indices, for ``sparse_value``). Both run
the Triton kernel on CUDA (or when asked with backend="triton": on CPU that is Triton's
interpreter, for tests) and plain PyTorch otherwise; the PyTorch path is moram.functional,
the specification every fast path is tested against.
"""
from __future__ import annotations

import torch

from .. import functional as MF
from . import routing_triton

BACKENDS = ("auto", "torch", "triton")


def _use_triton(h: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not routing_triton.triton_available():
        raise RuntimeError("backend='triton' asked for, but triton cannot be imported")
    if backend == "auto":
        return h.is_cuda and routing_triton.triton_available()
    return backend == "triton"


def _as_rows(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1]).contiguous()


def fused_route_mix(
    h: torch.Tensor,
    k: int,
    tau: float,
    delta: float | None = None,
    eps: float = MF.DEFAULT_EPS,
    *,
    backend: str = "auto",
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """w ⊙ h [..., R] with w = route(h, k, tau, delta, eps) (Eqs. 5-8), differentiable in h.

    ``return_weights`` also returns w (detached, h's dtype): the activation statistics.
    Pass ``delta`` at inference only, as for route().
    """
    if not _use_triton(h, backend) or h.shape[-1] == 0 or h.numel() == 0:
        w = MF.route(h, k, tau, delta, eps)
        return (w * h, w.detach()) if return_weights else w * h
    k_eff = MF.effective_k(k, h.shape[-1])
    out = routing_triton.TritonRouteMix.apply(_as_rows(h), k_eff, tau, delta, eps, False, return_weights)
    if return_weights:
        mixed, w = out
        return mixed.view(h.shape), w.view(h.shape)
    return out.view(h.shape)


def route_topk_reference(
    h: torch.Tensor, k: int, tau: float, delta: float | None = None, eps: float = MF.DEFAULT_EPS,
    *, return_weights: bool = False, ascending: bool = True,
):
    """Eqs. 5-8 in compact form, in PyTorch. The softmax over the k_eff kept scores equals
    route()'s softmax over the -inf-masked vector, and s = h / max(||h||, eps) scales a row by
    one positive number, so the top-k of h is the top-k of s: only the kept scores are divided.
    Indices ascending, as the kernel writes them (``ascending=False``: in any order, which saves
    a sort; with k_eff = R they are 0..R-1 either way)."""
    k_eff = MF.effective_k(k, h.shape[-1])
    wide = h.to(torch.promote_types(h.dtype, torch.float32))
    denom = wide.norm(dim=-1, keepdim=True).clamp_min(eps)             # Eq. 5, for the kept only
    if k_eff == h.shape[-1]:                                            # every atom is kept
        kept, h_kept = torch.arange(k_eff, device=h.device).expand(h.shape), h
    else:
        _, kept = h.topk(k_eff, dim=-1, sorted=False)                   # Eq. 6
        if ascending:
            kept = kept.sort(dim=-1).values
        h_kept = h.gather(-1, kept)
    s_kept = h_kept.to(wide.dtype) / denom
    w = torch.softmax(s_kept / tau, dim=-1)                             # Eq. 7
    if delta is not None and delta > 0:
        w = w * (s_kept >= delta)                                       # Eq. 8
    w = w.to(h.dtype)
    coef = w * h_kept
    return (coef, kept, w.detach()) if return_weights else (coef, kept)


def fused_route_topk(
    h: torch.Tensor,
    k: int,
    tau: float,
    delta: float | None = None,
    eps: float = MF.DEFAULT_EPS,
    *,
    backend: str = "auto",
    return_weights: bool = False,
    ascending: bool = True,
) -> tuple[torch.Tensor, ...]:
    """The kept mixed coefficients (w ⊙ h)[kept] [..., k_eff] (differentiable in h) and their
    atom indices [..., k_eff] (int64, ascending): the input of sparse_value().

    ``return_weights`` adds the kept weights w[kept] [..., k_eff] (detached); an atom's activation
    mass is then ``zeros(R).index_add_(0, idx.flatten(), w.flatten())``.
    With R = 0 all are empty ([..., 0]). ``ascending=False`` lets the PyTorch path skip sorting
    the indices (the kernel writes them ascending anyway; with k_eff = R they are 0..R-1)."""
    if h.shape[-1] == 0:
        idx = torch.zeros(h.shape, dtype=torch.int64, device=h.device)
        return (h, idx, h.detach()) if return_weights else (h, idx)
    if not _use_triton(h, backend) or h.numel() == 0:
        return route_topk_reference(h, k, tau, delta, eps, return_weights=return_weights, ascending=ascending)
    k_eff = MF.effective_k(k, h.shape[-1])
    outputs = routing_triton.TritonRouteMix.apply(_as_rows(h), k_eff, tau, delta, eps, True, return_weights)
    shape = (*h.shape[:-1], k_eff)
    return tuple(t.view(shape) for t in outputs)
