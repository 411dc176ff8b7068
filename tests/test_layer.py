"""The atom-bank layer: growth, freezing, routing membership, baselines, statistics."""
import math

import pytest
import torch
from torch import nn

from moram import MoRAMConfig, get_moram_model
from moram.functional import moram_delta
from moram.layer import MoRAMLayer
from fixtures.models import tiny_gpt2, tiny_llama


def zero_linear(d_in=4, d_out=2):
    base = nn.Linear(d_in, d_out)
    nn.init.zeros_(base.weight), nn.init.zeros_(base.bias)
    return base


def golden_layer(delta=0.65):
    """A layer holding the 4 hand-made atoms of test_functional as one frozen task."""
    layer = MoRAMLayer(zero_linear(), MoRAMConfig(r=4, k=2, tau=0.5, delta=delta, dropout=0.0,
                                                  target_modules=["x"]), name="golden")
    A = torch.eye(4)
    B = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 0.0]])
    layer.append_frozen(A, B)
    return layer, A, B


def test_delta_acts_in_eval_mode_only():
    layer, A, B = golden_layer(delta=0.65)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, -2.0, 2.0, 0.0]])
    layer.train()
    torch.testing.assert_close(layer(x), moram_delta(x, A, B, k=2, tau=0.5))
    layer.eval()
    torch.testing.assert_close(layer(x), moram_delta(x, A, B, k=2, tau=0.5, delta=0.65))
    # token 1 in eval: only atom 1 survives δ with weight sigmoid(0.4): Δ = (8 w1, 4 w1).
    w1 = 1 / (1 + math.exp(-0.4))
    torch.testing.assert_close(layer(x)[0], torch.tensor([8 * w1, 4 * w1]))


def test_begin_task_appends_fresh_kaiming_atoms_and_zero_values():
    layer = MoRAMLayer(nn.Linear(64, 8), MoRAMConfig(r=3, target_modules=["x"]), name="l")
    layer.begin_task(0)
    assert layer.A.shape == (3, 64) and layer.B.shape == (8, 3)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5): gain √(2/6) · √(3/fan_in) = 1/√fan_in
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.8 * bound
    first = layer.A.detach().clone()
    layer.end_task(prune_mass=None)
    layer.begin_task(1)
    assert not torch.equal(layer.A.detach(), first)  # really fresh atoms for every task


def test_untrained_atoms_take_no_part_in_routing():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=4, tau=0.1, dropout=0.0))
    ids = torch.randint(0, 128, (2, 9))
    _train(model, ids, steps=3)
    model.end_task()
    model.eval()
    before = model(ids).logits
    model.begin_task("next")
    model.eval()
    # B = 0 adds nothing, but routing them would steal softmax mass from the frozen atoms.
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    layer = next(iter(model.moram_layers.values()))
    assert layer.num_routed == layer.num_frozen
    model.train()
    assert layer.num_routed == layer.num_frozen + 4


def test_gradients_reach_only_current_atoms_and_frozen_state_is_bit_identical():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=4, tau=0.1))
    ids = torch.randint(0, 128, (2, 9))
    _train(model, ids, steps=3)
    model.end_task()
    frozen = {n: (l.frozen_A.clone(), l.frozen_B.clone()) for n, l in model.moram_layers.items()}
    base = {n: p.detach().clone() for n, p in model.model.named_parameters()}

    model.begin_task("second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    # An optimizer over *every* parameter (weight decay included) must still move only new atoms.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (name in trainable), name
        optimizer.step(), optimizer.zero_grad()
    model.end_task()
    for name, layer in model.moram_layers.items():
        old_A, old_B = frozen[name]
        assert torch.equal(layer.frozen_A[: old_A.shape[0]], old_A)
        assert torch.equal(layer.frozen_B[:, : old_B.shape[1]], old_B)
    for name, p in model.model.named_parameters():
        assert torch.equal(p, base[name]), name


def test_freezing_bakes_the_scale_without_changing_outputs():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.2, alpha=12.0, prune_mass=None))
    ids = torch.randint(0, 128, (2, 9))
    _train(model, ids, steps=3)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    layer = next(iter(model.moram_layers.values()))
    B_scaled = layer.B.detach() * 3.0  # alpha / r = 12 / 4
    model.end_task()
    torch.testing.assert_close(layer.frozen_B, B_scaled)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained)


def test_inclora_sums_dense_adapters():
    base = nn.Linear(6, 5)
    layer = MoRAMLayer(base, MoRAMConfig(r=2, method="inclora", dropout=0.0, target_modules=["x"]), name="l")
    A1, B1, A2, B2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(2, 6), torch.randn(5, 2)
    layer.append_frozen(A1, B1), layer.append_frozen(A2, B2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x) + x @ A1.t() @ B1.t() + x @ A2.t() @ B2.t())


def test_seqlora_keeps_training_one_adapter():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, method="seqlora", prune_mass=None))
    ids = torch.randint(0, 128, (2, 9))
    _train(model, ids, steps=2)
    model.end_task()
    layer = next(iter(model.moram_layers.values()))
    after_first = (layer.frozen_A.clone(), layer.frozen_B.clone())
    model.begin_task("second")
    assert layer.num_frozen == 0 and layer.num_current == 4
    torch.testing.assert_close(layer.A.detach(), after_first[0])
    torch.testing.assert_close(layer.B.detach() * model.moram_config.scale, after_first[1])
    model.end_task()
    assert layer.num_frozen == 4  # still one rank-r adapter


def test_moelora_gates_experts_with_a_learned_router():
    base = zero_linear(3, 2)
    layer = MoRAMLayer(base, MoRAMConfig(r=1, method="moelora", dropout=0.0, target_modules=["x"]), name="l")
    A1, B1, G1 = torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0, 0]])
    A2, B2, G2 = torch.tensor([[0, 1.0, 0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([[0, 0, 1.0]])
    layer.append_frozen(A1, B1, {"router": G1}), layer.append_frozen(A2, B2, {"router": G2})
    x = torch.tensor([[2.0, 3.0, 1.0]])
    # gate = softmax(x·G) = softmax(2, 1); expert 1 outputs (2, 0), expert 2 outputs (0, 3).
    g1 = math.exp(2) / (math.exp(2) + math.exp(1))
    torch.testing.assert_close(layer(x), torch.tensor([[2 * g1, 3 * (1 - g1)]]))


def test_stats_count_routing_mass_of_real_tokens_only():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=2, tau=0.1))
    model.begin_task("t")
    model.train()
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model(input_ids=ids, attention_mask=mask)
    for layer in model.moram_layers.values():
        # each of the 9 real tokens hands out a total weight of exactly 1 across the atoms
        torch.testing.assert_close(layer.activation_mass.sum(), torch.tensor(9.0))


def test_gpt2_conv1d_is_wrapped_and_exposes_weight():
    model = get_moram_model(tiny_gpt2(), MoRAMConfig(r=2, target_modules=["c_attn", "c_proj"]))
    names = list(model.moram_layers)
    assert any(n.endswith("attn.c_attn") for n in names) and any(n.endswith("mlp.c_proj") for n in names)
    layer = model.moram_layers[names[0]]
    assert layer.weight is layer.base.weight and layer.in_features == 32 and layer.out_features == 96


def test_open_task_and_double_begin_are_errors():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2))
    model.begin_task("a")
    with pytest.raises(RuntimeError, match="still open"):
        model.begin_task("b")
    model.end_task()
    with pytest.raises(RuntimeError, match="without begin_task"):
        model.end_task()


def test_set_routing_validates_and_applies():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2))
    model.set_routing(delta=0.5, k=3)
    assert all(l.delta == 0.5 and l.k == 3 for l in model.moram_layers.values())
    with pytest.raises(ValueError, match="delta"):
        model.set_routing(delta=1.5)


def _train(model, ids, steps):
    model.begin_task(f"task-{model.num_tasks}")
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad()
