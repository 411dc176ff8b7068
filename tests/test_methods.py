"""The method strategies (moram.methods) and the knobs that change a method's arithmetic.

Golden values are computed by hand in the comments; nothing here compares our code to itself
except where a test says "the same as" a path already golden-tested in test_functional.
"""
import importlib.util
import math

import pytest
import torch
from torch import nn

from moram import METHODS, MoRAMConfig, ShardError, get_moram_model, read_shard
from moram.functional import moram_delta
from moram.layer import MoRAMLayer
from moram.methods import IncLoRA, MoELoRA, MoRAM, OLoRA, SeqLoRA
from fixtures.models import tiny_llama


def zero_linear(d_in, d_out):
    base = nn.Linear(d_in, d_out)
    nn.init.zeros_(base.weight), nn.init.zeros_(base.bias)
    return base


def layer_for(method, d_in=4, d_out=2, **config):
    config = MoRAMConfig(method=method, dropout=0.0, target_modules=["x"], **config)
    return MoRAMLayer(zero_linear(d_in, d_out), config, name="l")


def train_tasks(method, tasks=2, seed=0, **config):
    model = get_moram_model(tiny_llama(seed), MoRAMConfig(r=4, k=3, tau=0.1, method=method, **config))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    shards = []
    for t in range(tasks):
        model.begin_task(f"task-{t}")
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            (model(input_ids=ids, labels=ids).loss + model.extra_loss()).backward()
            optimizer.step(), optimizer.zero_grad()
        model.end_task()
        shards.append(model.export_shard())
    return model.eval(), shards, ids


# -- the registry and each strategy's rules --------------------------------------------------------
def test_registry_names_every_strategy_by_its_config_name():
    assert {name: cls for name, cls in METHODS.items()} == {
        "moram": MoRAM, "seqlora": SeqLoRA, "inclora": IncLoRA, "moelora": MoELoRA, "olora": OLoRA}
    assert [name for name, cls in METHODS.items() if cls.prunes] == ["moram"]
    assert {name: cls.shard_mode for name, cls in METHODS.items()} == {
        "moram": "append", "seqlora": "replace", "inclora": "append", "moelora": "append", "olora": "append"}


@pytest.mark.parametrize("method", ["moram", "inclora", "moelora", "olora"])
def test_a_task_adds_a_fresh_block_beside_the_frozen_atoms(method):
    layer = layer_for(method, r=2)
    layer.append_frozen(torch.eye(4)[:3], torch.ones(2, 3), {"router": torch.ones(1, 4)} if method == "moelora" else None)
    layer.begin_task(1)
    assert layer.num_frozen == 3 and layer.num_current == 2
    assert torch.count_nonzero(layer.B) == 0
    block = {name for name, _ in layer.named_parameters() if not name.startswith("base.")}
    assert block == ({"A", "B", "router"} if method == "moelora" else {"A", "B"})   # the method's task_tensors
    if method == "moelora":
        assert torch.count_nonzero(layer.router) == 0   # the new expert's gate key starts at 0


def test_seqlora_thaws_the_whole_bank_with_the_scale_taken_out():
    layer = layer_for("seqlora", r=2, alpha=8.0)              # scale 4
    A, B = torch.randn(2, 4), torch.randn(2, 2)
    layer.append_frozen(A, B)
    layer.begin_task(1)
    assert layer.num_frozen == 0 and layer.num_current == 2 and layer.current_trained
    torch.testing.assert_close(layer.A.detach(), A)
    torch.testing.assert_close(layer.B.detach(), B / 4)


@pytest.mark.parametrize("method", ["inclora", "seqlora", "olora"])
def test_lora_baselines_sum_their_atoms(method):
    layer = layer_for(method, r=2)
    h = torch.randn(3, 5)
    assert layer.mixture_weights(h, torch.randn(3, 4), current=False) is None


def test_moram_weights_are_the_routing_of_eqs_5_to_8():
    layer = layer_for("moram", r=4, k=2, tau=0.5, delta=0.65)
    h = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    # s = (0.6, 0.8, 0, 0); top-2 keeps atoms 0, 1; softmax((0.6, 0.8) / 0.5) = (1 - w1, w1)
    w1 = 1 / (1 + math.exp(-0.4))
    layer.train()
    torch.testing.assert_close(layer.mixture_weights(h, h, current=False), torch.tensor([[1 - w1, w1, 0, 0]]))
    layer.eval()   # δ = 0.65 drops atom 0 (s = 0.6), no renormalisation
    torch.testing.assert_close(layer.mixture_weights(h, h, current=False), torch.tensor([[0, w1, 0, 0]]))


@pytest.mark.parametrize("method, kept", [("moram", 2), ("inclora", 4), ("moelora", 4), ("olora", 4)])
def test_only_moram_prunes(method, kept):
    layer = layer_for(method, r=4)
    layer.begin_task(0)
    layer.current_trained = True
    layer.activation_mass = torch.tensor([0.5, 0.02, 0.45, 0.03])
    # by mass: atom 0 (0.5) covers 0.5 < 0.9 of the total 1.0; with atom 2 (0.45) 0.95 >= 0.9: two atoms
    block = layer.end_task(prune_mass=0.9)
    assert block.added == 4 and block.A.shape[0] == kept
    if method == "moram":
        assert block.kept.tolist() == [0, 2]


@pytest.mark.parametrize("method", list(METHODS))
def test_shards_carry_the_methods_mode(method):
    _, shards, _ = train_tasks(method, tasks=1)
    assert read_shard(shards[0]).mode == METHODS[method].shard_mode


# -- MoE-LoRA router: top-k and temperature --------------------------------------------------------
def three_experts(**config):
    """Expert i (rank 1): key e_i, value e_i, gate key e_i, so expert i outputs x_i e_i."""
    layer = layer_for("moelora", d_in=3, d_out=3, r=1, **config)
    for i in range(3):
        e = torch.eye(3)[i : i + 1]
        layer.append_frozen(e, e.t(), {"router": e})
    return layer


def test_moe_defaults_are_the_plain_softmax_over_all_experts():
    x = torch.tensor([[3.0, 2.0, 1.0]])
    z = math.exp(3) + math.exp(2) + math.exp(1)
    expected = torch.tensor([[3 * math.exp(3) / z, 2 * math.exp(2) / z, 1 * math.exp(1) / z]])
    torch.testing.assert_close(three_experts()(x), expected)


def test_moe_top_k_and_tau():
    x = torch.tensor([[3.0, 2.0, 1.0]])                   # gate logits x · e_i = (3, 2, 1)
    # top-2, τ = 0.5: softmax(6, 4) over experts 1, 2 = (1/(1+e^-2), 1/(1+e^2)); expert 3 gets 0
    g1, g2 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    torch.testing.assert_close(three_experts(moe_top_k=2, moe_tau=0.5)(x), torch.tensor([[3 * g1, 2 * g2, 0.0]]))
    # all experts, τ = 2: softmax(1.5, 1, 0.5)
    z = math.exp(1.5) + math.exp(1.0) + math.exp(0.5)
    expected = torch.tensor([[3 * math.exp(1.5) / z, 2 * math.exp(1.0) / z, math.exp(0.5) / z]])
    torch.testing.assert_close(three_experts(moe_tau=2.0)(x), expected)
    # top-1: the best expert alone, with weight 1
    torch.testing.assert_close(three_experts(moe_top_k=1)(x), torch.tensor([[3.0, 0.0, 0.0]]))



def test_alpha_defaults_to_each_methods_official_scale():
    # MoRAM: lora_alpha = 2r (official training/main.py:409); the LoRA baselines: r 8, alpha 32.
    defaults = {method: MoRAMConfig(method=method, r=8).alpha for method in METHODS}
    assert defaults == {"moram": 16.0, "seqlora": 32.0, "inclora": 32.0, "moelora": 32.0, "olora": 32.0}
    assert MoRAMConfig(method="seqlora", r=4).scale == 4.0 and MoRAMConfig(method="seqlora", alpha=16).alpha == 16

# -- frozen_scale ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen_scale, after_freeze", [("baked", [2.0, 4.0]), ("official", [1.0, 2.0])])
def test_official_frozen_scale_halves_a_frozen_atoms_contribution(frozen_scale, after_freeze):
    layer = layer_for("inclora", d_in=2, d_out=2, r=2, alpha=4.0, frozen_scale=frozen_scale)   # scale 2
    layer.begin_task(0)
    with torch.no_grad():
        layer.A.copy_(torch.eye(2)), layer.B.copy_(torch.eye(2))
    layer.current_trained = True
    x = torch.tensor([[1.0, 2.0]])
    # training: Δ = scale · B A x = 2 · (1, 2)
    torch.testing.assert_close(layer(x), torch.tensor([[2.0, 4.0]]))
    layer.end_task(prune_mass=None)
    # baked: B·2 frozen, Δ unchanged; official: B frozen as is, Δ = (1, 2), half
    torch.testing.assert_close(layer(x), torch.tensor([after_freeze]))


def test_official_frozen_scale_halves_moram_atoms_too():
    outputs = {}
    for frozen_scale in ("baked", "official"):
        model, _, ids = train_tasks("moram", tasks=1, prune_mass=None, frozen_scale=frozen_scale)
        layer = next(iter(model.moram_layers.values()))
        outputs[frozen_scale] = layer(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
        base = layer.base(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    # routing reads only A: the same w, and Δ = B (w ⊙ h) with B halved
    torch.testing.assert_close(outputs["official"] - base, (outputs["baked"] - base) / 2)


def test_shards_of_another_frozen_scale_are_refused():
    _, shards, _ = train_tasks("moram", tasks=1, frozen_scale="official")
    fresh = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1))
    with pytest.raises(ShardError, match="frozen_scale='official'"):
        fresh.load_shards(shards)


# -- route_untrained ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route_untrained", [False, True])
def test_route_untrained_routes_a_fresh_block(route_untrained):
    layer = layer_for("moram", r=4, k=2, tau=0.5, delta=0.0, route_untrained=route_untrained)
    A, B = torch.eye(4), torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 0.0]])
    layer.append_frozen(A, B)
    layer.begin_task(1)
    layer.eval()
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, -2.0, 2.0, 0.0]])
    assert layer.num_routed == (8 if route_untrained else 4)
    if route_untrained:
        # the fresh atoms (B = 0) add nothing but take part in the top-k and the softmax
        expected = moram_delta(x, torch.cat([A, layer.A.detach()]), torch.cat([B, torch.zeros(2, 4)], 1), k=2, tau=0.5)
    else:
        expected = moram_delta(x, A, B, k=2, tau=0.5)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("route_untrained", [False, True])
def test_an_untrained_block_opened_for_evaluation_routes_only_with_route_untrained(route_untrained):
    """open_untrained_block(): the next task's fresh atoms (as its training would draw them, B = 0)
    on a loaded version; with route_untrained they take routing mass (and so change the output,
    though they add nothing themselves), without it the model is the loaded version exactly."""
    _, shards, ids = train_tasks("moram", tasks=1)
    plain = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1)).eval()
    plain.load_shards(shards)
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1, route_untrained=route_untrained)).eval()
    model.load_shards(shards)
    model.open_untrained_block()
    nxt = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1))
    nxt.load_shards(shards)
    nxt.begin_task("task-1")                         # what training the next task would start from
    for name, layer in model.moram_layers.items():
        torch.testing.assert_close(layer.A, nxt.moram_layers[name].A, rtol=0, atol=0)
        assert not layer.B.any() and not layer.A.requires_grad
        assert layer.num_routed == layer.num_frozen + (4 if route_untrained else 0)
    with torch.no_grad(), model.collect_activation_stats():
        logits = model(input_ids=ids).logits
    on_block = sum(float(mass[layer.num_frozen:].sum()) for mass, layer in
                   zip(model.activation_stats().values(), model.moram_layers.values()))
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    if route_untrained:
        assert on_block > 0 and not torch.allclose(logits, reference)
    else:
        assert on_block == 0
        torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    model.load_shards(shards)                        # the next version drops it
    assert all(layer.num_current == 0 for layer in model.moram_layers.values())


def test_seqlora_has_no_untrained_block_to_open():
    model, _, _ = train_tasks("seqlora", tasks=1)
    with pytest.raises(ValueError, match="seqlora trains one block for all tasks"):
        model.open_untrained_block()

# -- O-LoRA ------------------------------------------------------------------------------------------
def test_olora_loss_by_hand():
    layer = layer_for("olora", d_in=2, d_out=2, r=1, olora_lambda1=0.5, olora_lambda2=0.25)
    layer.append_frozen(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2))
    layer.begin_task(1)
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[3.0, -1.0]])), layer.B.copy_(torch.tensor([[0.0], [4.0]]))
    # A_old · A_newᵀ = (1·3 + 0·-1, 0·3 + 2·-1) = (3, -2): L1 = 5, times λ1 = 2.5
    # ||A_new||_F = √10, ||B_new||_F = 4: times λ2 = 0.25 (√10 + 4)
    expected = 2.5 + 0.25 * (math.sqrt(10) + 4)
    assert layer.extra_loss().item() == pytest.approx(expected, rel=1e-6)


def test_olora_default_lambdas_are_the_official_ones_and_other_methods_add_nothing():
    config = MoRAMConfig(method="olora")
    assert (config.olora_lambda1, config.olora_lambda2) == (0.5, 0.0)
    for method in ("moram", "inclora", "seqlora", "moelora"):
        model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, method=method))
        model.begin_task("t")
        extra = model.extra_loss()
        assert extra.item() == 0.0 and not extra.requires_grad


def test_olora_model_loss_sums_layers_and_its_gradients_reach_only_the_new_block():
    model, _, ids = train_tasks("olora", tasks=1, olora_lambda2=0.1)
    frozen = {n: (l.frozen_A.clone(), l.frozen_B.clone()) for n, l in model.moram_layers.items()}
    model.begin_task("second")
    model.train()
    # by hand per layer: λ1 Σ|A_old A_newᵀ| + λ2 (||A_new|| + ||B_new||), B_new = 0 at the start
    by_hand = sum(0.5 * (l.frozen_A @ l.A.t()).abs().sum() + 0.1 * torch.linalg.norm(l.A)
                  for l in model.moram_layers.values())
    extra = model.extra_loss()
    torch.testing.assert_close(extra, by_hand.detach(), rtol=1e-5, atol=0)
    extra.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if name.endswith(".A"):
            assert p.grad.abs().sum() > 0
    for name, layer in model.moram_layers.items():   # buffers: no gradient, untouched
        assert torch.equal(layer.frozen_A, frozen[name][0]) and torch.equal(layer.frozen_B, frozen[name][1])


def test_olora_shards_round_trip_exactly(tmp_path):
    model, shards, ids = train_tasks("olora", tasks=2)
    assert [read_shard(s).mode for s in shards] == ["append", "append"]
    fresh = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1, method="olora"))
    fresh.load_shards(shards)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.atom_counts() == model.atom_counts() == {n: 8 for n in model.moram_layers}


# -- a method owns its per-task tensors; shards written before that still load ---------------------
LEGACY = __import__("pathlib").Path(__file__).parent / "fixtures" / "legacy_shards"


def test_the_routes_flag_and_the_declared_task_tensors():
    assert {name: cls.routes for name, cls in METHODS.items()} == {
        "moram": True, "seqlora": False, "inclora": False, "moelora": True, "olora": False}
    assert {name: [t.name for t in cls.task_tensors] for name, cls in METHODS.items() if cls.task_tensors} == {
        "moelora": ["router"]}


@pytest.mark.parametrize("method", ["moram", "moelora", "seqlora"])
def test_shards_written_before_methods_owned_their_state_still_load(method):
    """tests/fixtures/legacy_shards (make.py there) were written by commit 9ca377b's code: loaded
    today, the model gives the logits it gave then (to float32 rounding: the eval path changed)."""
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("make_legacy", LEGACY / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    model = get_moram_model(tiny_llama(), make.config(method))
    model.load_shards([LEGACY / f"{method}-task{t}.safetensors" for t in range(2)])
    with torch.no_grad():
        logits = model.eval()(input_ids=make.IDS).logits
    torch.testing.assert_close(logits, load_file(LEGACY / "expected.safetensors")[method], rtol=1e-5, atol=1e-5)
    if method == "moelora":   # the routers as the method's per-task tensor, one row per task
        layer = next(iter(model.moram_layers.values()))
        assert layer.frozen_router.shape == (2, layer.in_features)
        assert layer.frozen_block.tolist() == [0] * 4 + [1] * 4


def test_a_moelora_shard_without_its_router_is_refused_naming_it(tmp_path):
    from moram.persistence import read_shard as read, shard_to_bytes

    shard = read(LEGACY / "moelora-task0.safetensors")
    blocks = {}
    for key, tensor in shard.tensors.items():
        layer, _, field = key[len("layers."):].rpartition(".")
        if field != "router":
            blocks.setdefault(layer, {})[field] = tensor
    stripped = shard_to_bytes(blocks, {k: v for k, v in shard.metadata.items()
                                       if k not in ("format", "format_version", "content_sha256")})
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1, method="moelora"))
    with pytest.raises(ShardError, match="needs its moelora 'router'"):
        model.load_shards([stripped])
