"""Golden cases for the routing equations, computed by hand (DESIGN.md, Eqs. 3-8)."""
import math

import pytest
import torch

from moram.functional import atoms_to_keep, moram_delta, route

TAU = 0.5
# Keys A = identity (4 atoms, d_in = 4), so the key response h equals the token itself.
A = torch.eye(4)
B = torch.tensor([[1.0, 2.0, 0.0, -1.0],
                  [0.0, 1.0, 3.0, 0.0]])          # d_out = 2, a column (value) per atom
X = torch.tensor([[3.0, 4.0, 0.0, 0.0],             # token 1: ||h|| = 5, s = (.6, .8, 0, 0)
                  [1.0, -2.0, 2.0, 0.0]])           # token 2: ||h|| = 3, s = (1/3, -2/3, 2/3, 0)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# k = 2, tau = 0.5, by hand:
# token 1 keeps atoms 1 (s=.8) and 0 (s=.6): w1 = e^{1.6}/(e^{1.2}+e^{1.6}) = sigmoid(0.4), w0 = 1 - w1.
# token 2 keeps atoms 2 (s=2/3) and 0 (s=1/3); atom 1 (s=-2/3) is large in magnitude but top-k is
# *signed*: w2 = sigmoid((2/3 - 1/3)/0.5) = sigmoid(2/3), w0 = 1 - w2.
W1_TOKEN1 = sigmoid((0.8 - 0.6) / TAU)
W2_TOKEN2 = sigmoid((1 / 3) / TAU)
W_TRAIN = torch.tensor([[1 - W1_TOKEN1, W1_TOKEN1, 0.0, 0.0],
                        [1 - W2_TOKEN2, 0.0, W2_TOKEN2, 0.0]])
# delta = 0.65 at inference: token 1 drops atom 0 (s=.6), token 2 drops atom 0 (s=1/3);
# the survivors keep their weights (no renormalisation).
W_EVAL = torch.tensor([[0.0, W1_TOKEN1, 0.0, 0.0],
                       [0.0, 0.0, W2_TOKEN2, 0.0]])


def expected_delta(w):
    # Δy = B (w ⊙ h) with h = x; token 1: (3 w0 + 8 w1, 4 w1); token 2: (w0 - 0 + 0, 6 w2).
    return torch.stack([
        torch.tensor([3 * w[0, 0] + 8 * w[0, 1], 4 * w[0, 1]]),
        torch.tensor([1 * w[1, 0] + 0.0, 6 * w[1, 2]]),
    ])


def test_route_golden_training_weights():
    torch.testing.assert_close(route(X @ A.t(), k=2, tau=TAU), W_TRAIN)


def test_route_golden_inference_threshold():
    torch.testing.assert_close(route(X @ A.t(), k=2, tau=TAU, delta=0.65), W_EVAL)


def test_delta_zero_or_none_means_no_gate():
    h = X @ A.t()
    torch.testing.assert_close(route(h, 2, TAU, delta=0.0), route(h, 2, TAU, delta=None))


def test_moram_delta_golden():
    torch.testing.assert_close(moram_delta(X, A, B, k=2, tau=TAU), expected_delta(W_TRAIN))
    torch.testing.assert_close(moram_delta(X, A, B, k=2, tau=TAU, delta=0.65), expected_delta(W_EVAL))


def test_k_at_least_r_is_a_dense_softmax():
    # token 1, all four atoms: softmax((.6, .8, 0, 0) / .5) = e^{(1.2, 1.6, 0, 0)} / Z
    z = math.exp(1.2) + math.exp(1.6) + 2.0
    expected = torch.tensor([math.exp(1.2) / z, math.exp(1.6) / z, 1 / z, 1 / z])
    for k in (4, 10):
        torch.testing.assert_close(route(X[:1], k=k, tau=TAU)[0], expected)


def test_k_below_two_still_mixes_two_atoms():
    # k_eff = min(max(1, 2), R) = 2: same as k = 2.
    torch.testing.assert_close(route(X, k=1, tau=TAU), W_TRAIN)


def test_ties_keep_exactly_k_atoms_with_equal_weight():
    w = route(torch.ones(3, 4), k=2, tau=TAU)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w[w > 0], torch.full((6,), 0.5))


def test_any_leading_shape():
    h = torch.randn(2, 3, 5, 6)
    w = route(h, k=3, tau=0.1)
    assert w.shape == h.shape
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    assert ((w > 0).sum(-1) == 3).all()


def test_bf16_agrees_with_float32():
    torch.manual_seed(0)
    x, a, b = (t.bfloat16() for t in (torch.randn(4, 7, 64), torch.randn(16, 64), torch.randn(32, 16)))
    half = moram_delta(x, a, b, k=4, tau=0.3)
    full = moram_delta(x.float(), a.float(), b.float(), k=4, tau=0.3)  # same inputs, float32 math
    assert half.dtype == torch.bfloat16 and route(x @ a.t(), 4, 0.3).dtype == torch.bfloat16
    # Top-k is discontinuous: compare tokens whose 4th and 5th scores are clearly apart.
    s = torch.nn.functional.normalize(x.float() @ a.float().t(), dim=-1).sort(-1, descending=True).values
    clear = (s[..., 3] - s[..., 4]) > 0.01
    assert clear.float().mean() > 0.5
    error = (half.float()[clear] - full[clear]).abs().max() / full[clear].abs().max()
    assert error < 0.02  # bf16 keeps ~3 significant digits


def test_differentiable_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: moram_delta(x, a, b, k=2, tau=0.7), (x, a, b))


def test_zero_response_does_not_divide_by_zero():
    w = route(torch.zeros(2, 4), k=2, tau=0.1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


@pytest.mark.parametrize("mass, coverage, kept", [
    # total 10: the largest (5) covers 50%; 5+3 = 80%; 5+3+1.5 = 95%; + .5 = 100%.
    ([1.5, 5.0, 0.5, 3.0], 0.5, [1]),
    ([1.5, 5.0, 0.5, 3.0], 0.8, [1, 3]),
    ([1.5, 5.0, 0.5, 3.0], 0.9, [0, 1, 3]),
    ([1.5, 5.0, 0.5, 3.0], 0.99, [0, 1, 2, 3]),
    ([0.0, 4.0, 0.0, 0.0], 0.99, [1]),
])
def test_atoms_to_keep_smallest_covering_set(mass, coverage, kept):
    assert atoms_to_keep(torch.tensor(mass), coverage).tolist() == kept
