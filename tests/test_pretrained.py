"""save_pretrained / from_pretrained: only the atoms are written; a fresh base model plus a saved
folder, a registry export or a registry version is the trained model again."""
import json

import pytest
import torch
from fixtures.memory import RUN
from fixtures.models import tiny_llama

from moram import MoRAMConfig, get_moram_model, load_causal_lm, model_fingerprint
from moram.pretrained import CONFIG_FILE, PretrainedError, from_pretrained, save_pretrained
from moram_platform.generation import RegistrySpec, base_model_path, memory_source
from moram_platform.registry import BaseModelRef, Registry, VersionNotFoundError

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]])


def _train(model, task: str, steps: int = 2):
    model.begin_task(task)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.end_task()
    return model.export_shard()


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture
def two_task_model():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    shards = [_train(model, "first"), _train(model, "second")]
    return model, shards


def test_save_writes_only_atoms_and_a_config_and_reloads_exactly(tmp_path):
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    _train(model, "first")
    save_pretrained(model, tmp_path / "after-1")             # saving after every task keeps every shard
    _train(model, "second")
    folder = save_pretrained(model, tmp_path / "after-2", base_model_id="tiny-llama")

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["atoms/task-000.safetensors", "atoms/task-001.safetensors", CONFIG_FILE]
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < base_bytes / 5
    document = json.loads((folder / CONFIG_FILE).read_text())
    assert document["tasks"] == ["first", "second"]
    assert document["base_model"] == {"id": "tiny-llama", "revision": None}
    assert document["moram_config"]["r"] == 2

    reloaded = from_pretrained(tiny_llama(), folder)
    assert reloaded.task_names == ["first", "second"] and not reloaded.training
    assert torch.equal(_logits(reloaded), _logits(model))
    # a reloaded model saves again, with the shards it was loaded from
    again = save_pretrained(reloaded, tmp_path / "again")
    assert torch.equal(_logits(from_pretrained(tiny_llama(), again)), _logits(model))


def test_several_tasks_without_saving_need_their_shards(tmp_path, two_task_model):
    model, shards = two_task_model
    with pytest.raises(PretrainedError, match="finished 2 tasks but can re-export only the last one"):
        save_pretrained(model, tmp_path / "nope")
    folder = save_pretrained(model, tmp_path / "given", shards=shards)
    assert torch.equal(_logits(from_pretrained(tiny_llama(), folder)), _logits(model))
    with pytest.raises(PretrainedError, match=r"the shards hold tasks \['first'\], the model has finished"):
        save_pretrained(model, tmp_path / "short", shards=shards[:1])


def test_views_at_load_time(tmp_path, two_task_model):
    model, shards = two_task_model
    folder = save_pretrained(model, tmp_path / "m", shards=shards)
    viewed = from_pretrained(tiny_llama(), folder, delta=0.9, prune_mass=0.5)
    layer = next(iter(viewed.moram_layers.values()))
    assert layer.delta == 0.9
    assert sum(viewed.atom_counts().values()) < sum(model.atom_counts().values())
    # the folder is untouched: without views it is the trained model again
    assert torch.equal(_logits(from_pretrained(tiny_llama(), folder)), _logits(model))


def test_bad_folders_are_clear_errors(tmp_path, two_task_model):
    model, shards = two_task_model
    folder = save_pretrained(model, tmp_path / "m", shards=shards)
    (folder / "atoms" / "task-001.safetensors").unlink()
    with pytest.raises(PretrainedError, match="the weights file atoms/task-001.safetensors is missing"):
        from_pretrained(tiny_llama(), folder)

    altered = save_pretrained(model, tmp_path / "altered", shards=shards)
    data = bytearray((altered / "atoms" / "task-000.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (altered / "atoms" / "task-000.safetensors").write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="sha256 does not match"):
        from_pretrained(tiny_llama(), altered)

    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="neither moram_config.json .* nor manifest.json"):
        from_pretrained(tiny_llama(), tmp_path / "empty")
    with pytest.raises(PretrainedError, match="no such folder"):
        from_pretrained(tiny_llama(), tmp_path / "absent")


def test_registry_export_and_registry_version_load_like_a_saved_folder(tmp_path, registry_uri, two_task_model):
    model, shards = two_task_model
    registry = Registry(registry_uri)
    for shard in shards:
        registry.commit("tiny-run", shard, base_model=BaseModelRef("tiny-llama", "rev-a"))
    exported = registry.export("tiny-run", 2, tmp_path / "export")
    expected = _logits(model)
    assert torch.equal(_logits(from_pretrained(tiny_llama(), exported)), expected)
    assert torch.equal(_logits(from_pretrained(tiny_llama(), RegistrySpec(registry_uri, "tiny-run", 2))), expected)
    latest = memory_source(f"{registry_uri}#tiny-run")
    assert torch.equal(_logits(from_pretrained(tiny_llama(), latest)), expected)
    first = from_pretrained(tiny_llama(), RegistrySpec(registry_uri, "tiny-run", 1))
    assert first.task_names == ["first"]

    with pytest.raises(PretrainedError, match=r"trained on base model 'tiny-llama' \(revision rev-a\), but the "
                                              "given base model has revision rev-b"):
        from_pretrained(tiny_llama(), exported, base_model_revision="rev-b")
    with pytest.raises(VersionNotFoundError, match="run tiny-run: version 3 does not exist"):
        from_pretrained(tiny_llama(), RegistrySpec(registry_uri, "tiny-run", 3))
    with pytest.raises(VersionNotFoundError, match="run other has no versions"):
        from_pretrained(tiny_llama(), RegistrySpec(registry_uri, "other"))


def test_registry_spec_text():
    assert RegistrySpec.parse("s3://bucket/moram#trace-run@3") == RegistrySpec("s3://bucket/moram", "trace-run", 3)
    assert RegistrySpec.parse("/data/reg#run@latest") == RegistrySpec("/data/reg", "run")
    assert RegistrySpec.parse("/data/reg#a@b") == RegistrySpec("/data/reg", "a@b")  # '@' is legal in run names
    assert str(RegistrySpec("/r", "run", 2)) == "/r#run@2"
    with pytest.raises(ValueError, match="expected URI#RUN"):
        RegistrySpec.parse("no-hash-here")


@pytest.mark.slow
def test_real_smollm2_memory_round_trips_through_registry_and_folder(trained_memory, tmp_path):
    spec = RegistrySpec(str(trained_memory.registry_root), RUN, 1)
    memory = spec.load_memory()
    assert base_model_path(memory) == trained_memory.model_dir     # the manifest's base model, checked
    tokens = None
    for source in (spec, None):
        base, tokenizer = load_causal_lm(trained_memory.model_dir)
        if source is None:   # a save_pretrained folder of the registry-loaded model
            source = save_pretrained(model, tmp_path / "saved")
        model = from_pretrained(base, source, base_model_revision=model_fingerprint(trained_memory.model_dir))
        tokens = tokens or tokenizer([trained_memory.prompt], return_tensors="pt")
        with torch.no_grad():
            logits = model(**tokens).logits[0, -1]
        torch.testing.assert_close(logits, trained_memory.logits, rtol=0, atol=1e-4)
    base, _ = load_causal_lm(trained_memory.model_dir)
    with torch.no_grad():
        plain = base(**tokens).logits[0, -1]
    assert (plain - trained_memory.logits).abs().max() > 1e-3          # the memory does change the model


def test_model_methods_save_only_atoms_reload_and_refuse_base_weight_keywords(tmp_path):
    """PEFT habits on the model itself: model.save_pretrained / MoRAMModel.from_pretrained, and
    Hugging Face's keywords never turn a save into a silent multi-GB base-weight dump."""
    from moram import MoRAMModel

    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    _train(model, "first")
    folder = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["moram_config.json", "task-000.safetensors"]
    with pytest.raises(TypeError, match=r"writes only the atoms; unexpected \['safe_serialization'\]"):
        model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert not (tmp_path / "hf").exists()

    reloaded = MoRAMModel.from_pretrained(tiny_llama(), folder, delta=0.5)
    assert reloaded.moram_config.delta == 0.5 and reloaded.task_names == ["first"]
    assert reloaded.config is reloaded.model.config            # the Hugging Face config, for generate/pipelines
    model.set_routing(delta=0.5)
    assert torch.equal(_logits(reloaded), _logits(model))     # the same atoms under the same δ view


def test_set_routing_updates_the_stored_config(tmp_path):
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    _train(model, "first")
    model.set_routing(delta=0.4, k=3)
    assert (model.moram_config.delta, model.moram_config.k) == (0.4, 3)
    folder = model.save_pretrained(tmp_path / "saved")
    assert json.loads((folder / CONFIG_FILE).read_text())["moram_config"]["delta"] == 0.4


def test_disable_adapter_is_the_base_model_inside_and_changes_nothing():
    """PEFT's ``with model.disable_adapter():`` -- the base model's exact logits inside (frozen and
    current atoms off, train and eval mode), the memory's own outputs after, even after a raise;
    no weight, routing knob or statistic is touched by the forwards inside."""
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.1))
    _train(model, "first")
    model.begin_task("second")                      # an open task: its current atoms are untrained
    base = tiny_llama()                             # the same weights, never wrapped

    def logits(m):
        torch.manual_seed(0)                        # the atom branch's dropout draws the same mask
        return m(input_ids=TOKENS).logits

    for training in (True, False):
        model.train(training), base.train(training)
        with torch.no_grad():
            memory = logits(model)
        assert not torch.equal(memory, logits(base).detach())     # the atoms do change the model
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        stats = model.activation_stats()
        with model.disable_adapter():
            inside = logits(model)                  # with grad, as a training step would run it
            with model.disable_adapter():           # nested: still the base model, and restored once
                assert torch.equal(logits(model), inside)
        assert torch.equal(inside, logits(base))
        assert all(not layer.current_trained for layer in model.moram_layers.values())
        assert all(torch.equal(stats[name], mass) for name, mass in model.activation_stats().items())
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(logits(model), memory)

    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            raise RuntimeError("raised inside")
    with torch.no_grad():
        assert torch.equal(logits(model), memory)  # eval mode, atoms back after the raise
