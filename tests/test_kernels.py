"""The fast paths of moram.kernels against the specification, moram.functional.

The Triton kernel runs here on CPU tensors under Triton's interpreter, which Triton fixes when
it is first imported: triton is imported below with TRITON_INTERPRET=1 (moram itself imports it
lazily, on the first kernel launch), and the variable is restored afterwards so that nothing else
in the session, nor any process it starts, inherits it. Sizes stay small: the interpreter is slow.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moram import functional as MF
from moram.kernels import (
    dense_value, fused_route_mix, fused_route_topk, route_topk_reference, routing_triton, sparse_value,
    triton_available,
)
from test_functional import TAU, W_EVAL, W_TRAIN, X


def import_triton_as_interpreter():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.experimental.gluon.language  # noqa: F401 - it asserts the mode when imported
        routing_triton._kernel()                   # decorate the kernel in that mode
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if triton_available():
    import_triton_as_interpreter()

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

BACKENDS = ["triton", "torch"]


def reference_mix(h, k, tau, delta=None):
    return MF.route(h, k, tau, delta) * h


def assert_close_in(dtype, actual, expected):
    """float32: to rounding; bfloat16: the largest error within ~2 bf16 steps of the largest value
    (the reference rounds in bf16 between its ops, the kernel only at the end)."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert actual.dtype == expected.dtype == dtype
        error = (actual.float() - expected.float()).abs().max()
        assert error <= 0.02 * expected.float().abs().max() + 1e-6, f"max error {error}"


def values_and_grad(fn, h, grad_out):
    h = h.detach().requires_grad_()
    out = fn(h)
    (grad_h,) = torch.autograd.grad(out, h, grad_out)
    return out.detach(), grad_h


# -- golden values (hand-computed in tests/test_functional.py) --------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_mix_training_and_inference(backend):
    h = X  # A = identity there, so h = x
    torch.testing.assert_close(fused_route_mix(h, 2, TAU, backend=backend), W_TRAIN * h)
    torch.testing.assert_close(fused_route_mix(h, 2, TAU, delta=0.65, backend=backend), W_EVAL * h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_compact(backend):
    coef, idx = fused_route_topk(X, 2, TAU, backend=backend)
    # token 1 keeps atoms 0 and 1, token 2 atoms 0 and 2 (ascending indices)
    assert idx.tolist() == [[0, 1], [0, 2]]
    torch.testing.assert_close(coef, (W_TRAIN * X).gather(-1, idx))


# -- against the specification: values and gradients -----------------------------------------
CASES = [
    # (name, R, k, delta)
    ("k<R", 24, 5, None),
    ("delta", 24, 5, 0.15),
    ("R<k: dense softmax", 3, 16, None),
    ("k=1 -> k_eff=2", 7, 1, None),
    ("R=1", 1, 16, None),
    ("R=k", 16, 16, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, R, k, delta", CASES, ids=[c[0] for c in CASES])
def test_triton_mix_matches_route(name, R, k, delta, dtype):
    torch.manual_seed(R * 100 + k)
    h = torch.randn(2, 9, R).to(dtype)  # a leading shape of two dims
    grad_out = torch.randn(2, 9, R).to(dtype)
    out, grad = values_and_grad(lambda h: fused_route_mix(h, k, 0.3, delta, backend="triton"), h, grad_out)
    ref_out, ref_grad = values_and_grad(lambda h: reference_mix(h, k, 0.3, delta), h, grad_out)
    assert out.shape == h.shape and out.dtype == dtype
    assert_close_in(dtype, out, ref_out)
    assert_close_in(dtype, grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R, k", [(19, 4), (3, 16), (7, 1)], ids=["k<R", "R<k", "k=1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_matches_route(backend, R, k, dtype):
    torch.manual_seed(1)
    h = torch.randn(11, R).to(dtype)
    coef, idx = fused_route_topk(h, k, 0.2, 0.1, backend=backend)
    k_eff = MF.effective_k(k, R)
    assert coef.shape == idx.shape == (11, k_eff) and idx.dtype == torch.int64
    assert (idx.diff(dim=-1) > 0).all()  # ascending atom indices
    dense = torch.zeros_like(h).scatter(-1, idx, coef)
    assert_close_in(dtype, dense, reference_mix(h, k, 0.2, 0.1))

    grad_out = torch.randn(11, k_eff).to(dtype)
    _, grad = values_and_grad(lambda h: fused_route_topk(h, k, 0.2, backend=backend)[0], h, grad_out)
    # the same gradient as the dense mix with the incoming gradient placed on the kept atoms
    _, ref_grad = values_and_grad(lambda h: reference_mix(h, k, 0.2), h,
                                  torch.zeros_like(h).scatter(-1, idx, grad_out))
    assert_close_in(dtype, grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_for_statistics(backend):
    torch.manual_seed(2)
    h = torch.randn(6, 10, requires_grad=True)
    expected = MF.route(h, 3, 0.5, 0.2).detach()
    mixed, w = fused_route_mix(h, 3, 0.5, 0.2, backend=backend, return_weights=True)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(mixed, w * h)
    coef, idx, w_kept = fused_route_topk(h, 3, 0.5, 0.2, backend=backend, return_weights=True)
    torch.testing.assert_close(w_kept, expected.gather(-1, idx))
    torch.testing.assert_close(torch.zeros(10).index_add_(0, idx.flatten(), w_kept.flatten()),
                               MF.activation_mass(expected))
    assert not w.requires_grad and not w_kept.requires_grad and mixed.requires_grad


# -- ties: the kernel keeps the lowest atom indices among equal scores -------------------------
def route_lowest_index_ties(h, k, tau):
    """Eqs. 5-7 with the kernel's tie rule (a stable descending sort keeps the lowest indices)."""
    k_eff = MF.effective_k(k, h.shape[-1])
    s = MF.normalized_scores(h)
    kept = s.sort(dim=-1, descending=True, stable=True).indices[..., :k_eff]
    masked = torch.full_like(s, float("-inf")).scatter(-1, kept, s.gather(-1, kept))
    return torch.softmax(masked / tau, dim=-1).to(h.dtype)


TIES = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],     # all equal: atoms 0, 1 kept
                     [1.0, 2.0, 2.0, 2.0, 0.5, 2.0],     # four tied at the top: 1, 2
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])    # zero response: 0, 1, uniform weights


def test_ties_keep_lowest_indices_with_equal_weights():
    mixed = fused_route_mix(TIES, 2, TAU, backend="triton")
    kept = mixed != 0
    assert kept[0].tolist() == [True, True, False, False, False, False]
    assert kept[1].tolist() == [False, True, True, False, False, False]
    torch.testing.assert_close(mixed[:2][kept[:2]], torch.tensor([0.5, 0.5, 1.0, 1.0]))  # w = 1/2 each
    # the specification keeps the same number of atoms with the same weights, whichever tied ones
    reference = reference_mix(TIES, 2, TAU)
    torch.testing.assert_close(mixed.sort(dim=-1).values, reference.sort(dim=-1).values)
    _, idx = fused_route_topk(TIES, 3, TAU, backend="triton")
    assert idx.tolist() == [[0, 1, 2], [1, 2, 3], [0, 1, 2]]


def test_tie_gradients_follow_the_documented_rule():
    grad_out = torch.arange(18.0).view(3, 6) / 10
    _, grad = values_and_grad(lambda h: fused_route_mix(h, 2, TAU, backend="triton"), TIES, grad_out)
    _, ref_grad = values_and_grad(lambda h: route_lowest_index_ties(h, 2, TAU) * h, TIES, grad_out)
    torch.testing.assert_close(grad, ref_grad)
    # zero response (by hand): s = 0 everywhere, so only the direct term g·w survives, w = (.5, .5, 0...)
    torch.testing.assert_close(grad[2], torch.tensor([0.6, 0.65, 0.0, 0.0, 0.0, 0.0]))


# -- the compiled (CUDA) kernel ----------------------------------------------------------------
COMPILE_FOR_H100_CLASS = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moram.kernels import routing_triton

    routing_triton._import_triton()
    kernel = triton.jit(routing_triton._route_mix_body)
    signature = {"h_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*bf16", "idx_ptr": "*i64",
                 "n_tokens": "i32", "n_atoms": "i32", "k_eff": "i32", "inv_tau": "fp32", "delta": "fp32",
                 "eps": "fp32", **{name: "constexpr" for name in
                 ("HAS_DELTA", "BACKWARD", "COMPACT", "WRITE_W", "BLOCK_T", "BLOCK_R")}}
    variants = [(1, 0, 0, 1), (1, 0, 1, 0), (0, 0, 1, 1), (0, 1, 0, 0), (1, 1, 0, 0)]
    for has_delta, backward, compact, write_w in variants:
        modes = dict(HAS_DELTA=bool(has_delta), BACKWARD=bool(backward), COMPACT=bool(compact),
                     WRITE_W=bool(write_w), BLOCK_T=16, BLOCK_R=256)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=modes), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], modes
    print("compiled")
""")


def test_kernel_compiles_for_cuda_without_a_gpu():
    """Triton's real compiler (not the interpreter) down to sm_90 machine code, in a process of its
    own because this one imported triton in interpreter mode."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100_CLASS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


CUDA_AGAINST_ROUTE = textwrap.dedent("""
    import torch
    from moram import functional as MF
    from moram.kernels import fused_route_mix, fused_route_topk

    def route_lowest_index_ties(h, k, tau, delta):  # functional.route with the kernel's tie rule
        k_eff = MF.effective_k(k, h.shape[-1])
        s = MF.normalized_scores(h)
        kept = s.sort(dim=-1, descending=True, stable=True).indices[..., :k_eff]
        masked = torch.full_like(s, float("-inf")).scatter(-1, kept, s.gather(-1, kept))
        w = torch.softmax(masked / tau, dim=-1)
        return (w * (s >= delta) if delta else w).to(h.dtype)

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for R, k, delta in ((256, 16, None), (256, 16, 0.05), (56, 16, None), (3, 16, None), (2000, 16, None)):
            h = torch.randn(4097, R, device="cuda").to(dtype).requires_grad_()
            g = torch.randn_like(h)
            out = fused_route_mix(h, k, 0.03, delta)  # auto: the compiled kernel on CUDA
            (grad,) = torch.autograd.grad(out, h, g)
            ref = route_lowest_index_ties(h, k, 0.03, delta) * h  # bf16 has many exact ties
            (ref_grad,) = torch.autograd.grad(ref, h, g)
            for a, b in ((out, ref), (grad, ref_grad)):
                error = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
                assert error < tol, (dtype, R, k, delta, float(error))
            coef, idx = fused_route_topk(h, k, 0.03, delta)
            dense = torch.zeros_like(h).scatter(-1, idx, coef)
            assert (dense.float() - out.float()).abs().max() <= 1e-6, (dtype, R, "compact")
    print("matched")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernel_on_cuda_matches_route():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CUDA_AGAINST_ROUTE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "matched" in done.stdout, done.stderr[-3000:]


# -- empty banks and dispatch -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bank(backend):
    h = torch.zeros(4, 0, requires_grad=True)
    mixed = fused_route_mix(h, 16, TAU, backend=backend)
    coef, idx = fused_route_topk(h, 16, TAU, backend=backend)
    assert mixed.shape == coef.shape == idx.shape == (4, 0)
    assert sparse_value(coef, idx, torch.zeros(8, 0)).tolist() == [[0.0] * 8] * 4


def test_cpu_default_is_the_pytorch_reference():
    torch.manual_seed(3)
    h = torch.randn(5, 12)
    assert torch.equal(fused_route_mix(h, 4, 0.3), reference_mix(h, 4, 0.3))
    assert all(torch.equal(a, b) for a, b in zip(fused_route_topk(h, 4, 0.3), route_topk_reference(h, 4, 0.3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_route_mix(h, 4, 0.3, backend="cuda")


# -- the top-k-sparse value projection --------------------------------------------------------
def bank_with_current_block(d_out, frozen, current, dtype):
    """The frozen value columns and the trainable block (scale 2 applied, as the layer bakes it)."""
    frozen_B = torch.randn(d_out, frozen).to(dtype)
    current_B = torch.randn(d_out, current).to(dtype).requires_grad_()
    return frozen_B, current_B


def value_by_layout(layout, frozen_B, current_B):
    """Call sparse_value with the bank whole (torch.cat, as the layer does today) or in its two parts."""
    if layout == "whole":
        return lambda c, i, **kw: sparse_value(c, i, torch.cat([frozen_B, current_B * 2.0], dim=1), **kw)
    return lambda c, i, **kw: sparse_value(c, i, frozen_B, current_B * 2.0, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["whole", "split"])
@pytest.mark.parametrize("min_atoms_per_k", [0, float("inf")], ids=["sparse", "dense"])
def test_sparse_value_matches_dense(min_atoms_per_k, layout, dtype):
    torch.manual_seed(4)
    tokens, k, d_out = 13, 3, 10
    frozen_B, current_B = bank_with_current_block(d_out, frozen=20, current=4, dtype=dtype)
    idx = torch.stack([torch.randperm(24)[:k] for _ in range(tokens)]).sort(-1).values
    idx[0] = torch.tensor([20, 21, 23])  # a token routed only to the current block
    idx[1] = torch.tensor([0, 5, 19])    # and one only to frozen atoms
    coef = torch.randn(tokens, k).to(dtype).requires_grad_()
    grad_out = torch.randn(tokens, d_out).to(dtype)
    fast_value = value_by_layout(layout, frozen_B, current_B)

    def run(fn):
        out = fn(coef, idx)
        return (out.detach(), *torch.autograd.grad(out, (coef, current_B), grad_out))

    fast = run(lambda c, i: fast_value(c, i, min_atoms_per_k=min_atoms_per_k))
    # the dense reference, written out: mixed [tokens, R] with zeros outside the kept atoms
    bank = torch.cat([frozen_B, current_B * 2.0], dim=1)
    slow = run(lambda c, i: torch.zeros(tokens, 24, dtype=dtype).scatter(-1, i, c) @ bank.t())
    for a, b in zip(fast, slow):
        assert_close_in(dtype, a, b)


def test_sparse_value_frozen_bank_gets_its_gradient_too():
    torch.manual_seed(7)
    frozen_B = torch.randn(5, 30, requires_grad=True)
    coef, idx = torch.randn(4, 3), torch.stack([torch.randperm(30)[:3] for _ in range(4)])
    grad_out = torch.randn(4, 5)
    (fast,) = torch.autograd.grad(sparse_value(coef, idx, frozen_B, min_atoms_per_k=0), frozen_B, grad_out)
    (slow,) = torch.autograd.grad(dense_value(coef, idx, frozen_B), frozen_B, grad_out)
    torch.testing.assert_close(fast, slow)


def test_sparse_value_threshold_and_shapes():
    torch.manual_seed(5)
    B = torch.randn(6, 40)
    coef, idx = torch.randn(2, 3, 4), torch.randint(0, 40, (2, 3, 4))
    out = sparse_value(coef, idx, B, min_atoms_per_k=8)  # 40 >= 8 * 4: sparse; any leading shape, repeats sum
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, dense_value(coef, idx, B))
    only_current = sparse_value(coef, idx, B[:, :0], B, min_atoms_per_k=0)  # no frozen atoms yet
    torch.testing.assert_close(only_current, out)
    with pytest.raises(ValueError, match="same shape"):
        sparse_value(coef, idx[..., :2], B)


@pytest.mark.parametrize("delta", [None, 0.1])
def test_fast_update_matches_moram_delta(delta):
    """x -> h = x·Aᵀ -> compact routing (Triton) -> sparse value == functional.moram_delta,
    values and gradients for x, the keys and the current block of values."""
    torch.manual_seed(6)
    d_in, d_out, frozen, current, k = 12, 9, 28, 4, 3
    x = torch.randn(2, 5, d_in, requires_grad=True)
    A = torch.randn(frozen + current, d_in, requires_grad=True)
    frozen_B, current_B = bank_with_current_block(d_out, frozen, current, torch.float32)
    grad_out = torch.randn(2, 5, d_out)

    def run(update):
        out = update()
        return (out.detach(), *torch.autograd.grad(out, (x, A, current_B), grad_out))

    def fast():
        coef, idx = fused_route_topk(x @ A.t(), k, 0.3, delta, backend="triton")
        return sparse_value(coef, idx, frozen_B, current_B * 2.0, min_atoms_per_k=0)

    def bank():
        return torch.cat([frozen_B, current_B * 2.0], dim=1)

    for a, b in zip(run(fast), run(lambda: MF.moram_delta(x, A, bank(), k, 0.3, delta))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
