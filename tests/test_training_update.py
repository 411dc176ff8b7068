"""MoRAM's fused training update (kernels.training_update, issue 25.3) against the equations
(moram.functional.moram_delta over the concatenated bank): values and gradients, float32 and
bfloat16, an empty frozen bank, R < k, dense and sparse value paths, ties, batch 1, a ragged
batch; and the layer's statistics, which stay where the routing runs until read."""
import pytest
import torch
from torch import nn

from moram import MoRAMConfig
from moram import functional as MF
from moram.kernels import training_update, uses_training_update
from moram.kernels.sparse_value import SPARSE_MIN_ATOMS_PER_K
from moram.layer import MoRAMLayer

D_IN, D_OUT, TAU = 24, 12, 0.1


def bank(n_frozen, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    frozen_keys = torch.randn(n_frozen, D_IN, generator=g).to(dtype)
    frozen_values = (torch.randn(n_frozen, D_OUT, generator=g) * 0.5).to(dtype)   # rows, scale baked in
    A = torch.randn(r, D_IN, generator=g).to(dtype).requires_grad_()
    current = (torch.randn(D_OUT, r, generator=g) * 0.5).to(dtype).requires_grad_()  # B·α/r
    return frozen_keys, frozen_values, A, current


def spec(x, y, frozen_keys, frozen_values, A, current, k):
    """y + B · (w ⊙ h) over [A_frozen; A] and [B_frozen | B·α/r]: Eqs. 3-7 as written."""
    keys = torch.cat([frozen_keys, A])
    values = torch.cat([frozen_values.t(), current], dim=1)
    return y + MF.moram_delta(x, keys, values, k, TAU)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def assert_close(dtype, actual, expected, exact=None):
    """float32: to rounding. bfloat16: the two round at different points, and a gradient that sums
    terms of opposite sign can lose most of its bits, so the fused value is held to the float64
    equations (``exact``, from the same bf16 inputs): no further from them than twice the bf16
    equations themselves, plus 1 % of the largest entry."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    exact = expected.double() if exact is None else exact
    ours = (actual.double() - exact).abs().max()
    theirs = (expected.double() - exact).abs().max()
    assert ours <= 2 * theirs + 0.01 * exact.abs().max() + 1e-6, f"max error {ours} (the bf16 equations: {theirs})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_frozen, r, k", [(0, 8, 4), (3, 2, 8), (48, 8, 8), (120, 8, 8)],
                         ids=["empty-bank", "R<k", "dense-value", "sparse-value"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=["batch1", "batch3x5"])
def test_values_and_gradients_match_the_equations(dtype, n_frozen, r, k, shape):
    if n_frozen + r >= SPARSE_MIN_ATOMS_PER_K * MF.effective_k(k, n_frozen + r):
        assert n_frozen == 120  # the sparse forward is the one taken at R = 128, k = 8
    frozen_keys, frozen_values, A, current = bank(n_frozen, r, dtype)
    x = torch.randn(*shape, D_IN).to(dtype).requires_grad_()
    y = torch.randn(*shape, D_OUT).to(dtype).requires_grad_()
    probe = torch.randn(*shape, D_OUT).to(dtype)  # a loss that weighs every output differently
    results = []
    for update in ("fused", "spec", "exact"):
        if update == "exact":  # float64 from the same (bf16-valued) inputs
            x, y, frozen_keys, frozen_values, A, current = (
                t.detach().double().requires_grad_(t.requires_grad)
                for t in (x, y, frozen_keys, frozen_values, A, current))
            out = spec(x, y, frozen_keys, frozen_values, A, current, k)
            results.append((out, *torch.autograd.grad((out * probe.double()).sum(), [x, y, A, current])))
            break
        if update == "fused":
            out, idx, w = training_update(x, y, frozen_keys, A, frozen_values, current, k, TAU)
            k_eff = MF.effective_k(k, n_frozen + r)
            assert idx.shape == w.shape == (*shape, k_eff) and not w.requires_grad
            # the reported weights are the specification's weights of the kept atoms
            expected_w = MF.route(torch.cat([x @ frozen_keys.t(), x @ A.t()], -1), k, TAU)
            assert_close(dtype, w, expected_w.gather(-1, idx).detach())
        else:
            out = spec(x, y, frozen_keys, frozen_values, A, current, k)
        assert out.dtype == dtype
        results.append((out, *torch.autograd.grad((out * probe).sum(), [x, y, A, current])))
    for fused, expected, exact in zip(*results):
        assert_close(dtype, fused, expected, exact)


def test_float64_gradients_pass_gradcheck():
    """The hand-written backward against finite differences (the norm's gradient included)."""
    frozen_keys, frozen_values, A, current = (t.double().detach() for t in bank(6, 4, torch.float32))
    A.requires_grad_(), current.requires_grad_()
    x = torch.randn(5, D_IN, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, D_OUT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, A, current: training_update(x, y, frozen_keys, A, frozen_values, current, 3, TAU)[0],
        (x, y, A, current))


def test_ties_at_the_kth_score_between_identical_atoms():
    """Two atoms with the same key and value tie at the k-th score: whichever one top-k keeps, the
    output and the gradients are the equations' (which keep one of them too)."""
    frozen_keys, frozen_values, A, current = bank(5, 4, torch.float32)
    frozen_keys[1], frozen_values[1] = frozen_keys[0], frozen_values[0]
    x = torch.randn(7, D_IN, requires_grad=True)
    y = torch.zeros(7, D_OUT)
    h = torch.cat([x @ frozen_keys.t(), x @ A.t()], -1).detach()
    results = []
    for k in range(2, 9):  # the tie falls at the boundary for some token at some k
        out = training_update(x, y, frozen_keys, A, frozen_values, current, k, TAU)[0]
        expected = spec(x, y, frozen_keys, frozen_values, A, current, k)
        for a, b in zip((out, *torch.autograd.grad(out.sum(), [x, A])),
                        (expected, *torch.autograd.grad(expected.sum(), [x, A]))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        ranks = h.argsort(-1, descending=True)
        results.append(((ranks[:, k - 1] <= 1) & (ranks[:, k] <= 1)).any().item())
    assert any(results)  # some case really had the two tied atoms straddle the k-th place


def test_a_ragged_batch_reads_each_row_as_alone():
    """Rows of different lengths, left-padded: each row's output and its gradient share are its own
    (the update is per token: padding never enters another row's routing)."""
    frozen_keys, frozen_values, A, current = bank(20, 8, torch.float32)
    rows = [torch.randn(n, D_IN) for n in (6, 2, 4)]
    padded = torch.zeros(3, 6, D_IN)
    for i, row in enumerate(rows):
        padded[i, 6 - len(row):] = row
    out = training_update(padded, torch.zeros(3, 6, D_OUT), frozen_keys, A, frozen_values, current, 4, TAU)[0]
    for i, row in enumerate(rows):
        alone = training_update(row, torch.zeros(len(row), D_OUT), frozen_keys, A, frozen_values, current, 4, TAU)[0]
        torch.testing.assert_close(out[i, 6 - len(row):], alone, rtol=1e-5, atol=1e-5)  # GEMM blocking


def test_the_layer_trains_through_it_and_counts_the_same_statistics(monkeypatch):
    """A MoRAM layer in training takes the fused update on CPU (MORAM_FUSED_TRAINING=0: the composed
    path): same output, gradients and activation mass both ways."""
    results = {}
    for fused in (True, False):
        monkeypatch.setenv("MORAM_FUSED_TRAINING", "1" if fused else "0")
        torch.manual_seed(0)
        layer = MoRAMLayer(nn.Linear(D_IN, D_OUT), MoRAMConfig(r=4, k=3, dropout=0.0, target_modules=["x"]), name="l")
        layer.append_frozen(torch.randn(30, D_IN), torch.randn(D_OUT, 30))
        layer.begin_task(0)
        with torch.no_grad():
            layer.B.normal_()
        layer.train().collect_stats = True
        x = torch.randn(2, 5, D_IN)
        assert uses_training_update(x) == fused
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [layer.A, layer.B])
        results[fused] = (out, *grads, layer.activation_mass.clone())
    for fused, composed in zip(results[True], results[False]):
        torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-5)
    assert results[True][-1].sum().item() == pytest.approx(10.0, rel=1e-5)  # 10 tokens, weights sum to 1


def test_statistics_read_in_between_keep_adding_up():
    """The mass accumulates where the routing runs and moves to the host when read; reading in the
    middle of a task neither loses nor doubles what was counted."""
    layer = MoRAMLayer(nn.Linear(D_IN, D_OUT), MoRAMConfig(r=4, k=2, dropout=0.0, target_modules=["x"]), name="l")
    layer.append_frozen(torch.randn(6, D_IN), torch.randn(D_OUT, 6))
    layer.begin_task(0)
    layer.train().collect_stats = True
    layer(torch.randn(3, D_IN))
    first = layer.activation_mass
    assert first.device.type == "cpu" and first.dtype == torch.float32 and first.sum().item() == pytest.approx(3.0)
    layer(torch.randn(4, D_IN))
    assert layer.activation_mass.sum().item() == pytest.approx(7.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the host sync it checks is a CUDA one")
def test_on_a_gpu_a_training_forward_does_not_sync_with_the_host():
    layer = MoRAMLayer(nn.Linear(D_IN, D_OUT), MoRAMConfig(r=4, k=2, dropout=0.0, target_modules=["x"]),
                       name="l").cuda()
    layer.append_frozen(torch.randn(6, D_IN, device="cuda"), torch.randn(D_OUT, 6, device="cuda"))
    layer.begin_task(0)
    layer.train().collect_stats = True
    x = torch.randn(3, D_IN, device="cuda")
    layer(x)  # the first forward may allocate and warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.activation_mass.sum().item() == pytest.approx(6.0, rel=1e-4)
