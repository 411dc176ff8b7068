"""The MoRAM routing (Eqs. 5-8) and the mix w ⊙ h as one Triton kernel, with its backward.

One kernel body serves both directions: a program loads a tile of tokens x all R atoms of h,
recomputes the L2 norm, the signed top-k selection, the float32 softmax and the δ gate in
registers, and then either writes the forward outputs or, with BACKWARD, reads the incoming
gradient and writes dL/dh. The backward therefore keeps nothing of size [tokens, R] from the
forward but h itself (which autograd holds anyway), and it routes exactly as the forward did.

Tie rule (documented, tested): the top-k is k_eff steps of "take the largest remaining signed
score; among equal scores the lowest atom index". ``torch.topk`` leaves ties unspecified (on
CPU it keeps e.g. indices 2, 3 of four equal scores; CUDA differs), so with ties the kernel and
``moram.functional.route`` keep the same number of atoms with the same weights, but possibly
different atoms of the tied group.

Triton compiles for CUDA. With TRITON_INTERPRET=1 set before triton is first imported, the same
kernel runs under Triton's interpreter, also on CPU tensors (slow: for tests).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

# Imported on first use (_import_triton), not with moram: whether Triton interprets is fixed when
# triton is first imported, and a test must be able to choose that before.
triton = tl = None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _import_triton() -> None:
    global triton, tl
    if triton is None:
        import triton as triton_module
        import triton.language as language

        triton, tl = triton_module, language


# Widest tile of fp32 values (tokens x padded atoms) one program keeps in registers.
_TILE_ELEMENTS = 4096
_MAX_TOKENS_PER_PROGRAM = 32


def _route_mix_body(
    h_ptr, g_ptr, out_ptr, w_ptr, idx_ptr,
    n_tokens, n_atoms, k_eff, inv_tau, delta, eps,
    HAS_DELTA: tl.constexpr, BACKWARD: tl.constexpr, COMPACT: tl.constexpr, WRITE_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows are tokens, columns atoms; h, g, out, w are contiguous [n_tokens, n_atoms] (COMPACT:
    out and idx are [n_tokens, k_eff]). Everything is computed in float32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_R)
    row_ok = rows < n_tokens
    inside = row_ok[:, None] & (cols < n_atoms)[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_atoms + cols[None, :]

    h = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    # Eq. 5: s = h / max(||h||, eps)
    norm = tl.sqrt(tl.sum(h * h, axis=1))
    denom = tl.maximum(norm, eps)
    s = h / denom[:, None]

    # Eq. 6: k_eff steps of "largest remaining score, lowest index among equals".
    remaining = tl.where(inside, s, float("-inf"))
    chosen = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.int32)
    for _ in range(k_eff):
        best = tl.max(remaining, axis=1)
        first = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_R), axis=1)
        pick = cols[None, :] == first[:, None]
        chosen = tl.where(pick, 1, chosen)
        remaining = tl.where(pick, float("-inf"), remaining)
    selected = (chosen > 0) & inside

    # Eq. 7: softmax over the kept scores, in float32. The row maximum is always kept.
    top = tl.max(tl.where(inside, s, float("-inf")), axis=1)
    e = tl.where(selected, tl.exp((s - top[:, None]) * inv_tau), 0.0)
    w = e / tl.maximum(tl.sum(e, axis=1), 1.0)[:, None]  # >= 1 on real rows (the top term is 1)
    # Eq. 8 (inference): zero the weights of atoms below delta, no renormalisation.
    if HAS_DELTA:
        gate = s >= delta
        w_gated = tl.where(gate, w, 0.0)
    else:
        w_gated = w

    out_type = out_ptr.dtype.element_ty
    # Round w to the output dtype before the product, as route(h).to(h.dtype) * h does.
    w_rounded = w_gated.to(out_type).to(tl.float32)
    if BACKWARD:
        g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        # out = w ⊙ h: direct term g·w, and the routing term through w.
        grad_w = g * h
        if HAS_DELTA:
            grad_w = tl.where(gate, grad_w, 0.0)
        grad_z = w * (grad_w - tl.sum(w * grad_w, axis=1)[:, None])   # softmax backward
        grad_s = grad_z * inv_tau
        # s = h / max(||h||, eps): project out the radial part when the norm is not clamped.
        radial = tl.where(norm >= eps, tl.sum(grad_s * s, axis=1), 0.0)
        grad_h = g * w_rounded + (grad_s - s * radial[:, None]) / denom[:, None]
        tl.store(out_ptr + offsets, grad_h.to(out_type), mask=inside)
    else:
        mixed = (w_rounded * h).to(out_type)
        if COMPACT:
            # The kept atoms in ascending index order: slot = rank among the kept.
            slot = tl.cumsum(chosen, axis=1) - 1
            compact = rows.to(tl.int64)[:, None] * k_eff + slot
            tl.store(out_ptr + compact, mixed, mask=selected)
            tl.store(idx_ptr + compact, cols[None, :].to(tl.int64) + tl.zeros_like(slot).to(tl.int64),
                     mask=selected)
            if WRITE_W:
                tl.store(w_ptr + compact, w_gated.to(w_ptr.dtype.element_ty), mask=selected)
        else:
            tl.store(out_ptr + offsets, mixed, mask=inside)
            if WRITE_W:
                tl.store(w_ptr + offsets, w_gated.to(w_ptr.dtype.element_ty), mask=inside)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors). Triton decides this when
    it is first imported, from TRITON_INTERPRET=1: its own library functions (tl.sum, tl.max)
    are built then, so the variable must be set before anything imports triton."""
    _import_triton()
    return type(tl.sum).__name__ == "InterpretedFunction"


@functools.cache
def _kernel():
    # Decorate on first use, in the mode triton's library functions were built in.
    _import_triton()
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpreting()
        return triton.jit(_route_mix_body)


def _launch(h2, g2, out, w, idx, k_eff, tau, delta, eps, *, backward, compact):
    if h2.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton routing kernel runs on CPU tensors only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before anything imports triton")
    n_tokens, n_atoms = h2.shape
    block_r = triton.next_power_of_2(max(n_atoms, 2))
    block_t = max(1, min(_MAX_TOKENS_PER_PROGRAM, _TILE_ELEMENTS // block_r))
    has_delta = delta is not None and delta > 0
    grid = (triton.cdiv(n_tokens, block_t),)
    _kernel()[grid](
        h2, h2 if g2 is None else g2, out, out if w is None else w, out if idx is None else idx,
        n_tokens, n_atoms, k_eff, 1.0 / tau, float(delta) if has_delta else 0.0, float(eps),
        HAS_DELTA=has_delta, BACKWARD=backward, COMPACT=compact, WRITE_W=w is not None,
        BLOCK_T=block_t, BLOCK_R=block_r,
    )


class TritonRouteMix(torch.autograd.Function):
    """(h [T, R]) -> w ⊙ h [T, R] (or, compact, the kept coefficients [T, k_eff] and their atom
    indices), plus the gated weights w when asked ([T, R], compact [T, k_eff]; detached: they
    feed the activation statistics)."""

    @staticmethod
    def forward(ctx, h2, k_eff, tau, delta, eps, compact, want_weights):
        n_tokens, n_atoms = h2.shape
        if compact:
            out = h2.new_zeros(n_tokens, k_eff)
            idx = torch.zeros(n_tokens, k_eff, dtype=torch.int64, device=h2.device)
        else:
            out, idx = torch.empty_like(h2), None
        w = torch.empty_like(out) if want_weights else None
        _launch(h2, None, out, w, idx, k_eff, tau, delta, eps, backward=False, compact=compact)
        ctx.save_for_backward(*[t for t in (h2, idx) if t is not None])
        ctx.routing = (k_eff, tau, delta, eps)
        ctx.compact = compact
        extras = [t for t in (idx, w) if t is not None]
        ctx.mark_non_differentiable(*extras)
        return (out, *extras) if extras else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *unused):
        h2 = ctx.saved_tensors[0]
        if ctx.compact:  # back to one gradient per atom (zero for the atoms not kept)
            idx = ctx.saved_tensors[1]
            grad_out = torch.zeros_like(h2).scatter_(1, idx, grad_out.to(h2.dtype))
        grad_out = grad_out.to(h2.dtype).contiguous()
        grad_h = torch.empty_like(h2)
        _launch(h2, grad_out, grad_h, None, None, *ctx.routing, backward=True, compact=False)
        return grad_h, None, None, None, None, None, None
