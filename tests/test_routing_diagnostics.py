"""Who routes to whom, by hand on a tiny model whose atoms we set ourselves.

Two tasks, two atoms each, on one 4 -> 4 linear layer. Task 0's keys are e0 (both atoms),
task 1's keys are e1, and task i's inputs are e_i. For an input e0 the key responses are
h = (1, 1, 0, 0); normalised s = (0.707, 0.707, 0, 0); with k = 4 nothing is masked and
w = softmax(s / 0.03) puts 2 / (2 + 2 exp(-23.6)) = 1 - 6e-11 of the mass on task 0's atoms:
the matrix is the identity to 1e-9, because each task's keys respond only to its own inputs.
An input (e0 + e1) / sqrt(2) answers both tasks' keys equally: half the mass on each.
"""
import math

import pytest
import torch
from torch import nn

from moram import MoRAMConfig, get_moram_model
from moram_platform.routing_diagnostics import (
    block_norms, evaluate_with_routing, training_shares, layer_group, own_shares, routes, routing_matrix, routing_row, task_blocks,
)


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def hand_set_model(method: str = "moram"):
    """Task i's two atoms have key e_i (value: anything non-zero)."""
    config = MoRAMConfig(method=method, target_modules=["proj"], r=2, k=4, tau=0.03, delta=0.0, dropout=0.0,
                         prune_mass=None)
    model = get_moram_model(OneLayer(), config)
    layer = model.moram_layers["proj"]
    shards = []
    for task in range(2):
        model.begin_task(f"t{task}")
        with torch.no_grad():
            layer.A.copy_(torch.zeros(2, 4))
            layer.A[:, task] = 1.0
            layer.B.copy_(torch.ones(4, 2))
        layer.current_trained = True        # as after a training step: the block routes
        model.end_task(prune=False)
        shards.append(model.export_shard())
    model.load_shards(shards)               # the bank as an evaluation loads it
    model.eval()
    return model, shards


def inputs_of(direction: torch.Tensor) -> torch.Tensor:
    return direction.expand(3, 5, 4).clone()     # a batch of 3 sequences, 5 tokens each


E0, E1 = torch.eye(4)[0], torch.eye(4)[1]


def test_disjoint_keys_route_each_task_to_its_own_atoms():
    model, shards = hand_set_model()
    blocks = task_blocks(shards)
    assert blocks == {"proj": [2, 2]}
    task_inputs = {"t0": inputs_of(E0), "t1": inputs_of(E1)}

    def evaluate(task):
        model(task_inputs[task])
        return {"task": task, "score": 0.0}

    scores = evaluate_with_routing(model, blocks, evaluate, ["t0", "t1"])
    matrix = routing_matrix(scores, ["t0", "t1"])
    leak = 2 * math.exp(-(1 / math.sqrt(2)) / 0.03) / (2 + 2 * math.exp(-(1 / math.sqrt(2)) / 0.03))
    assert matrix[0] == pytest.approx([1 - leak, leak], abs=1e-9)
    assert matrix[1] == pytest.approx([leak, 1 - leak], abs=1e-9)
    assert own_shares(matrix, 2) == pytest.approx([1.0, 1.0], abs=1e-9)
    assert scores["t0"]["routing"]["proj"] == scores["t0"]["routing"]["all"]   # one layer: one group
    assert model.activation_stats()["proj"].numel() == 0                       # statistics left clean


def test_an_input_both_keys_answer_splits_the_mass_evenly():
    model, shards = hand_set_model()
    mixed = inputs_of((E0 + E1) / math.sqrt(2))

    def evaluate(task):
        model(mixed)
        return {"score": 0.0}

    scores = evaluate_with_routing(model, task_blocks(shards), evaluate, ["t0"])
    assert scores["t0"]["routing"]["all"] == pytest.approx([0.5, 0.5], abs=1e-6)


def test_lora_baselines_have_no_routing_weights():
    model, shards = hand_set_model("inclora")
    assert not routes(model.method)
    scores = evaluate_with_routing(model, task_blocks(shards), lambda task: {"score": 1.0}, ["t0"])
    assert scores == {"t0": {"score": 1.0}}
    assert routes(get_moram_model(OneLayer(), MoRAMConfig(method="moelora", target_modules=["proj"])).method)


def test_routing_row_sums_mass_per_task_block_per_layer_group():
    # q_proj: atoms (1, 2 | 3) -> task 0 gets 3, task 1 gets 3; v_proj: (4 | 0) -> 4 and 0.
    mass = {"layers.0.q_proj": torch.tensor([1.0, 2.0, 3.0]), "layers.0.v_proj": torch.tensor([4.0, 0.0])}
    blocks = {"layers.0.q_proj": [2, 1], "layers.0.v_proj": [1, 1]}
    row = routing_row(mass, blocks)
    assert row["q_proj"] == pytest.approx([0.5, 0.5])
    assert row["v_proj"] == pytest.approx([1.0, 0.0])
    assert row["all"] == pytest.approx([0.7, 0.3])          # (3 + 4) / 10, (3 + 0) / 10
    assert layer_group("model.layers.3.self_attn.q_proj") == "q_proj"


def test_training_blocks_are_the_older_tasks_kept_atoms_then_the_tasks_own():
    from moram_platform.routing_diagnostics import training_blocks

    _, shards = hand_set_model()
    assert training_blocks(shards) == {"proj": [2, 2]}
    assert training_blocks(shards[:1]) == {"proj": [2]}


def two_task_shards(alpha=None, grow=False, train_on=None):
    """Two finished tasks on OneLayer: task t's two keys are size * e_t and its values size * ones(4),
    size = t + 1 with ``grow`` else 1; with ``train_on``, one training pass over train_on(t) before
    freezing (it collects the routing mass), else the block is only marked trained."""
    config = MoRAMConfig(method="moram", target_modules=["proj"], r=2, alpha=alpha, k=4, tau=0.03, delta=0.0,
                         dropout=0.0, prune_mass=None)
    model = get_moram_model(OneLayer(), config)
    layer, shards = model.moram_layers["proj"], []
    for task in range(2):
        size = task + 1.0 if grow else 1.0
        model.begin_task(f"t{task}")
        with torch.no_grad():
            layer.A.copy_(torch.zeros(2, 4))
            layer.A[:, task] = size
            layer.B.copy_(torch.full((4, 2), size))
        if train_on is None:
            layer.current_trained = True
        else:
            model.train()
            model(inputs_of(train_on(task)))
        model.end_task(prune=False)
        shards.append(model.export_shard())
    return shards


def test_block_norms_are_each_tasks_mean_key_and_frozen_value_norms():
    # Task t's two keys are (t + 1) e_t (norm t + 1); its values (t + 1) * ones(4) (norm 2 (t + 1)),
    # frozen with alpha / r = 4 / 2 = 2 baked in: 4 and 8. No shards: nothing to measure.
    norms = block_norms(two_task_shards(alpha=4, grow=True))
    assert norms["proj"] == norms["all"] == {"keys": pytest.approx([1.0, 2.0]), "values": pytest.approx([4.0, 8.0])}
    assert block_norms([]) is None


def test_training_shares_are_the_routing_mass_of_the_last_tasks_training_per_block():
    # Task 1 trains on inputs e0 (task 0's direction) over the bank [task 0's 2 atoms, its own 2]:
    # all mass goes to task 0's keys, as in test_disjoint_keys_route_each_task_to_its_own_atoms.
    shards = two_task_shards(train_on=lambda task: E0 if task else E1)
    assert training_shares(shards[:1])["all"] == pytest.approx([1.0])
    assert training_shares(shards)["proj"] == pytest.approx([1.0, 0.0], abs=1e-9)


def test_routing_row_gives_atoms_past_the_task_blocks_their_own_column():
    # 5 atoms routed, the tasks hold 2 + 1: the last 2 (an untrained block) are a third column.
    row = routing_row({"layers.0.q_proj": torch.tensor([1.0, 2.0, 3.0, 0.5, 1.5])}, {"layers.0.q_proj": [2, 1]})
    assert row["all"] == pytest.approx([3 / 8, 3 / 8, 2 / 8])


@pytest.mark.parametrize("route_untrained", [False, True])
def test_the_evaluated_model_routes_over_the_next_tasks_fresh_block_only_with_route_untrained(
        tmp_path, tiny_lm_dir, trace_root, route_untrained):
    """The evaluation pipeline (VersionEvaluator.load -> prepare_for_evaluation): with
    moram.route_untrained the scored model carries r more routed atoms, B = 0, and the task's
    routing record gives them a nonzero share; without it, the version's atoms only."""
    from fixtures.tiny_lm import tiny_trace_job
    from moram_platform.config import config_from_dict
    from moram_platform.evaluation import VersionEvaluator

    raw = tiny_trace_job(tmp_path, tiny_lm_dir, trace_root, ["SST-2"], "sqlite:///unused.db", "unused")
    raw["moram"].update(route_untrained=route_untrained, prune_mass=None)
    config = config_from_dict(raw)
    evaluator = VersionEvaluator(config)
    model, r = evaluator.model, config.moram_config.r
    model.begin_task("SST-2")                        # a version by hand: one task's atoms, B nonzero
    with torch.no_grad():
        for layer in model.moram_layers.values():
            layer.B.normal_()
            layer.current_trained = True
    model.end_task()
    evaluator.load([model.export_shard()])
    for layer in model.moram_layers.values():
        assert (layer.num_frozen, layer.num_routed) == (r, 2 * r if route_untrained else r)
    share = evaluator.score(["SST-2"], progress=False)["SST-2"]["routing"]["all"]
    if route_untrained:
        assert len(share) == 2 and share[1] > 0
        assert not any(layer.B.any() for layer in model.moram_layers.values())
    else:
        assert share == pytest.approx([1.0])
