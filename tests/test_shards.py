"""Shards: exact round trips, integrity checks, post-pruning."""
import json

import pytest
import torch
from torch import nn

from moram import MoRAMConfig, ShardError, get_moram_model, read_shard
from fixtures.models import tiny_llama


def trained_model(tasks=2, seed=0, **config):
    model = get_moram_model(tiny_llama(seed), MoRAMConfig(r=4, k=3, tau=0.1, **config))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    shards = []
    for t in range(tasks):
        model.begin_task(f"task-{t}")
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step(), optimizer.zero_grad()
        model.end_task()
        shards.append(model.export_shard())
    return model.eval(), shards, ids


@pytest.mark.parametrize("method", ["moram", "inclora", "seqlora", "moelora"])
def test_round_trip_reproduces_outputs_exactly(method, tmp_path):
    model, shards, ids = trained_model(method=method)
    paths = []
    for i, data in enumerate(shards):
        paths.append(tmp_path / f"{i}.safetensors")
        paths[-1].write_bytes(data)
    fresh = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1, method=method))
    fresh.load_shards(paths)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.task_names == ["task-0", "task-1"]
    assert fresh.atom_counts() == model.atom_counts()


def test_shard_metadata_and_layout():
    _, shards, _ = trained_model(tasks=1)
    shard = read_shard(shards[0])
    assert shard.metadata["task"] == "task-0" and shard.metadata["task_index"] == 0
    assert shard.metadata["mode"] == "append" and shard.metadata["config"]["r"] == 4
    assert set(shard.atom_counts) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    layer = shard.layer("model.layers.0.self_attn.q_proj")
    assert layer["A"].shape[1] == 32 and layer["B"].shape[0] == 32
    assert layer["routing_mass"].shape == (4,) and layer["mass"].dtype == torch.float32


def test_export_is_byte_deterministic():
    model, shards, _ = trained_model(tasks=1)
    assert model.export_shard() == model.export_shard() == shards[0]


def test_truncated_shard_is_refused(tmp_path):
    _, shards, _ = trained_model(tasks=1)
    for cut in (4, 100, len(shards[0]) - 10):
        with pytest.raises(ShardError, match="shard cut.safetensors: .*(truncated|unreadable)"):
            read_shard(shards[0][:cut], name="cut.safetensors")


def test_altered_byte_is_refused():
    _, shards, _ = trained_model(tasks=1)
    data = bytearray(shards[0])
    data[-5] ^= 0x01  # inside the tensor data: safetensors alone would not notice
    with pytest.raises(ShardError, match="shard x: content checksum mismatch"):
        read_shard(bytes(data), name="x")


def test_missing_shard_file_is_refused(tmp_path):
    with pytest.raises(ShardError, match="not-there.safetensors: file not found"):
        read_shard(tmp_path / "not-there.safetensors", name="not-there.safetensors")


def test_newer_format_version_is_refused():
    from safetensors.torch import save

    data = save({"layers.l.A": torch.zeros(1, 2)}, metadata={"format": "moram-shard", "format_version": "99"})
    with pytest.raises(ShardError, match="format version 99 is newer"):
        read_shard(data, name="future")


def test_shards_for_another_model_are_refused():
    _, shards, _ = trained_model(tasks=1)
    other = get_moram_model(tiny_llama(), MoRAMConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ShardError, match="layers do not match"):
        other.load_shards(shards)
    wrong_method = get_moram_model(tiny_llama(), MoRAMConfig(r=4, method="inclora"))
    with pytest.raises(ShardError, match="method 'moram'"):
        wrong_method.load_shards(shards)


def test_pruning_keeps_the_configured_mass_on_real_statistics():
    model, shards, _ = trained_model(tasks=2, prune_mass=0.9)
    for data in shards:
        shard = read_shard(data)
        for name in shard.layer_names:
            fields = shard.layer(name)
            task_mass = fields["routing_mass"][-4:]       # the task's own block, before pruning
            kept = fields["kept"]
            assert fields["mass"].sum() >= 0.9 * task_mass.sum() - 1e-4
            torch.testing.assert_close(fields["mass"], task_mass[kept])


def test_pruning_drops_atoms_that_carried_no_weight_without_changing_outputs():
    # Inputs live in the first 4 input dims; atoms 4-7 have keys orthogonal to them, so their
    # response h is exactly 0: they never win a top-2 slot and add nothing to ||h||.
    base = nn.Sequential(nn.Linear(8, 3))
    model = get_moram_model(base, MoRAMConfig(r=8, k=2, tau=0.5, dropout=0.0, prune_mass=0.99,
                                              target_modules=["0"]))
    model.begin_task("t")
    layer = model.moram_layers["0"]
    with torch.no_grad():
        layer.A.copy_(torch.cat([torch.eye(8)[:4], torch.eye(8)[4:]]))
        layer.B.copy_(torch.randn(3, 8))
    x = torch.cat([torch.rand(16, 4) + 0.1, torch.zeros(16, 4)], dim=1)  # positive: s_0..3 > 0
    model.train()
    model(x)  # one training forward: the block routes and its statistics accumulate
    model.eval()
    with torch.no_grad():
        unpruned = model(x)
    report = model.end_task(prune=True)
    assert report.kept == {"0": 4} and report.dropped() == {"0": 4}
    assert layer.num_frozen == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), unpruned)


def test_pruning_view_at_load_time_is_not_a_copy():
    model, shards, ids = trained_model(tasks=2, prune_mass=None)
    view = get_moram_model(tiny_llama(), MoRAMConfig(r=4, k=3, tau=0.1, prune_mass=None))
    view.load_shards(shards, prune_mass=0.5)
    full = sum(model.atom_counts().values())
    kept = sum(view.atom_counts().values())
    assert 0 < kept < full
    for data in shards:  # the stored shards are untouched
        assert sum(read_shard(data).atom_counts.values()) == full // 2
