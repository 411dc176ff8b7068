"""MoRAM's training update as one autograd function (issue 25.3).

    out = y + V[idx] · coef,   coef = w ⊙ h[idx],   w = softmax(h[idx] / (τ ‖h‖)),   idx = top-k(h)
    h = x · Kᵀ,   K = [A_frozen; A] [R, d_in],   V = [B_frozenᵀ; (B·α/r)ᵀ] [R, d_out]

Eqs. 3-7 of the paper (δ, Eq. 8, acts at inference only), the same computation as the composed
fast path (``MoRAM.update`` over ``fused_route_topk`` and ``sparse_value``) and as
``moram.functional`` (the specification, tests/test_fast_path.py). Why one function: composed,
the update records ~15 autograd nodes per wrapped layer; it computes the keys in two GEMMs (frozen
bank, open block) and their input gradient in two more plus an add; and its dense value backward
multiplies the output gradient by all R values, although only the k kept coefficients of a token
have a gradient. Here: one key GEMM each way over the concatenated keys, the kept coefficients'
gradient as k dot products per token (the per-sample-weights backward of embedding_bag, an ATen op),
and the routing's backward written out:

    ∂coef = g · V[idx]                          (per token and kept atom)
    ∂v    = ∂coef ⊙ w + ∂s / n,   ∂s = w ⊙ (u − Σ w ⊙ u) / τ,   u = ∂coef ⊙ v,   v = h[idx]
    ∂h    = scatter(idx, ∂v) + h · ∂n / n,   ∂n = −Σ ∂s ⊙ v / n²   (0 where ‖h‖ < eps: the clamp)
    ∂x    = ∂h · K,   ∂A = ∂h[:, R_frozen:]ᵀ · x,   ∂(B·α/r) = gᵀ · mixed[:, R_frozen:]

Routing runs in float32 or wider, the weights in h's dtype, as ``route_topk_reference`` does.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import functional as MF
from .sparse_value import SPARSE_MIN_ATOMS_PER_K


class MoRAMTrainingUpdate(torch.autograd.Function):
    """(x [N, d_in], y [N, d_out], frozen keys [R_f, d_in], A [r, d_in], frozen values [R_f, d_out],
    current values B·α/r [d_out, r], k, τ, eps) -> (out [N, d_out], idx [N, k_eff], w [N, k_eff]);
    idx and w (the kept atoms and their weights, for the statistics) carry no gradient."""

    @staticmethod
    def forward(ctx, x, y, frozen_keys, A, frozen_values, current_values, k, tau, eps):
        keys = torch.cat([frozen_keys, A.to(frozen_keys.dtype)])
        values = torch.cat([frozen_values, current_values.t().to(frozen_values.dtype)])
        n_atoms, n_frozen = keys.shape[0], frozen_keys.shape[0]
        k_eff = MF.effective_k(k, n_atoms)
        h = x @ keys.t()                                                      # Eq. 3
        wide = torch.promote_types(h.dtype, torch.float32)
        raw_norm = h.to(wide).norm(dim=-1, keepdim=True)
        norm = raw_norm.clamp_min(eps)                                        # Eq. 5's denominator
        if k_eff == n_atoms:
            idx = torch.arange(n_atoms, device=h.device).expand(h.shape).contiguous()
            kept = h
        else:
            kept, idx = h.topk(k_eff, dim=-1, sorted=False)                   # Eq. 6
        w = torch.softmax(kept.to(wide) / norm / tau, dim=-1).to(h.dtype)     # Eq. 7
        coef = w * kept
        # The current block's coefficients, dense [N, r]: their value gradient is one small GEMM.
        in_current = idx >= n_frozen
        current_mixed = coef.new_zeros(coef.shape[0], A.shape[0]).scatter_add_(
            -1, (idx - n_frozen).clamp_(min=0), coef.masked_fill(~in_current, 0))
        if n_atoms >= SPARSE_MIN_ATOMS_PER_K * k_eff:                       # the k kept values only
            delta = F.embedding_bag(idx, values, per_sample_weights=coef.to(values.dtype), mode="sum")
            out = delta.add_(y) if delta.dtype == y.dtype else y + delta.to(y.dtype)
        else:                                                                 # small bank: one GEMM
            mixed = coef.new_zeros(h.shape).scatter_(-1, idx, coef)
            out = torch.addmm(y, mixed.to(values.dtype), values) if values.dtype == y.dtype \
                else y + (mixed.to(values.dtype) @ values).to(y.dtype)
        # The inputs, not the concatenated copies: backward joins them again (R x d, a copy
        # beside its GEMMs) rather than keep two more [R, d] tensors per layer until then.
        ctx.save_for_backward(x, frozen_keys, A, frozen_values, current_values, h, raw_norm, norm, idx, w,
                              kept, current_mixed)
        ctx.tau, ctx.eps, ctx.n_frozen = tau, eps, n_frozen
        ctx.mark_non_differentiable(idx, w)
        return out, idx, w

    @staticmethod
    def backward(ctx, g, _idx_grad, _w_grad):
        x, frozen_keys, A, frozen_values, current_values, h, raw_norm, norm, idx, w, kept, current_mixed = \
            ctx.saved_tensors
        keys = torch.cat([frozen_keys, A.to(frozen_keys.dtype)])
        values = torch.cat([frozen_values, current_values.t().to(frozen_values.dtype)])
        n_frozen, (n_tokens, k_eff) = ctx.n_frozen, idx.shape
        grad_y = g if ctx.needs_input_grad[1] else None
        g_values = g.to(values.dtype).contiguous()
        grad_coef = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g_values, values, idx.reshape(-1),
            torch.arange(0, n_tokens * k_eff, k_eff, device=idx.device),      # each token is a bag of k
            torch.arange(n_tokens * k_eff, device=idx.device).div_(k_eff, rounding_mode="floor"),
            0, -1).view(n_tokens, k_eff)
        wide = norm.dtype
        grad_coef, w_wide, v = grad_coef.to(wide), w.to(wide), kept.to(wide)
        u = grad_coef * v
        grad_s = w_wide * (u - (w_wide * u).sum(-1, keepdim=True)) / ctx.tau
        grad_v = grad_coef * w_wide + grad_s / norm
        grad_norm = -(grad_s * v).sum(-1, keepdim=True) / norm.square()
        grad_norm = grad_norm.masked_fill_(raw_norm < ctx.eps, 0)
        grad_h = (h.to(wide) * (grad_norm / norm)).scatter_add_(-1, idx, grad_v).to(h.dtype)
        grad_x = grad_h @ keys if ctx.needs_input_grad[0] else None
        grad_A = (grad_h[:, n_frozen:].t() @ x).to(keys.dtype) if ctx.needs_input_grad[3] else None
        grad_current = (g_values.t() @ current_mixed.to(values.dtype)) if ctx.needs_input_grad[5] else None
        return grad_x, grad_y, None, grad_A, None, grad_current, None, None, None


def uses_training_update(x: torch.Tensor) -> bool:
    """Whether the layer trains through ``training_update`` here: on CPU, where it was measured
    faster (docs/performance.md), outside autocast (the function does not re-cast its inputs as
    autocast would) and outside torch.compile (which traces the composed path). On CUDA the
    Triton routing of the composed path serves training until bench/gpu_check.sh measures this.
    ``MORAM_FUSED_TRAINING=0`` turns it off (the composed path: benches, bisecting)."""
    return os.environ.get("MORAM_FUSED_TRAINING", "1") != "0" and x.device.type == "cpu" \
        and x.dtype.is_floating_point and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


def training_update(x: torch.Tensor, y: torch.Tensor, frozen_keys: torch.Tensor, A: torch.Tensor,
                    frozen_values: torch.Tensor, current_values: torch.Tensor, k: int, tau: float,
                    eps: float = MF.DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y + Δy for x [..., d_in] (after dropout) and the base output y [..., d_out], over the frozen
    bank (keys [R_f, d_in], values as rows [R_f, d_out], scale baked in) and the open block (A
    [r, d_in], values B·α/r [d_out, r]), with the kept atoms' indices and weights [..., k_eff]
    (detached: the statistics). Differentiable in x, y, A and current_values."""
    lead = x.shape[:-1]
    out, idx, w = MoRAMTrainingUpdate.apply(
        x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), frozen_keys, A, frozen_values,
        current_values, k, tau, eps)
    return out.view(*lead, -1), idx.view(*lead, -1), w.view(*lead, -1)
