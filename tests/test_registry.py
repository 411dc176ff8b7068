"""The memory registry on both backends (a local directory and a real S3 server): commit
protocol, reads, loading onto a base model, views, and every bad-input and fault case."""
import hashlib
import json
import threading
import traceback

import pytest
import torch

from fixtures.models import tiny_llama
from moram import MoRAMConfig, get_moram_model
from moram_platform.registry import (SCHEMA_VERSION, BaseModelRef, CommitConflictError, CommitError,
                                     InvalidNameError, ManifestError, Registry, ShardIntegrityError, StorageError,
                                     VersionNotFoundError, manifest_key, shard_key)
from moram_platform.registry.storage import S3Storage
from moram_platform.stack.seaweed import free_ports
from moram_platform.testing.shards import synthetic_shard

pytestmark = pytest.mark.timeout(120)

BASE = BaseModelRef("tiny-llama", revision="seed0")
RUN = "run-1"


# -- real shards: a tiny LLaMA trained on three tasks -------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """(trained model, [shard bytes per task], [TaskReport per task], probe input, reference logits)."""
    model = get_moram_model(tiny_llama(seed=0), MoRAMConfig(r=4, k=4, dropout=0.0, prune_mass=0.99))
    shards, reports = [], []
    for task in range(3):
        model.train()
        model.begin_task(f"task{task}")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        generator = torch.Generator().manual_seed(task)
        for _ in range(3):
            ids = torch.randint(0, 128, (4, 12), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        reports.append(model.end_task())
        shards.append(model.export_shard())
    model.eval()
    probe = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        reference = model(input_ids=probe).logits
    return model, shards, reports, probe, reference


@pytest.fixture
def registry(registry_uri):
    return Registry(registry_uri)


@pytest.fixture
def committed(registry, trained):
    """A run with the three trained tasks committed as versions 1..3."""
    _, shards, _, _, _ = trained
    return [registry.commit(RUN, shard, base_model=BASE, metrics={"accuracy": 50.0 + i, "task": i})
            for i, shard in enumerate(shards)]


def logits(model, probe):
    with torch.no_grad():
        return model.eval()(input_ids=probe).logits


# -- commit and read ---------------------------------------------------------------------------
def test_commits_become_versions_with_complete_manifests(registry, committed, trained):
    _, shards, reports, _, _ = trained
    assert registry.runs() == [RUN]
    assert registry.versions(RUN) == [1, 2, 3]
    assert registry.latest(RUN) == committed[-1]
    manifest = json.loads(registry.storage.read(manifest_key(RUN, 2)))
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert (manifest["run_id"], manifest["version"], manifest["parent_version"]) == (RUN, 2, 1)
    assert manifest["task"] == {"name": "task1", "index": 1}
    assert manifest["base_model"] == {"id": "tiny-llama", "revision": "seed0"}
    assert manifest["method"] == "moram" and manifest["config"]["r"] == 4
    assert manifest["metrics"] == {"accuracy": 51.0, "task": 1}
    assert manifest["created_at"].endswith("Z")
    assert [s["sha256"] for s in manifest["shards"]] == [hashlib.sha256(s).hexdigest() for s in shards[:2]]
    assert [s["size"] for s in manifest["shards"]] == [len(s) for s in shards[:2]]
    pruning = manifest["pruning"]
    assert pruning["atoms_added"] == reports[1].atoms_added and pruning["atoms_kept"] == reports[1].atoms_kept
    assert pruning["layers"] == {name: [reports[1].added[name], reports[1].kept[name]] for name in reports[1].added}
    # the shard is stored under its sha256 name, byte for byte
    assert registry.storage.read(shard_key(RUN, manifest["shards"][1]["sha256"])) == shards[1]


def test_lineage_runs_from_the_first_version(registry, committed):
    assert [v.version for v in registry.lineage(RUN, 3)] == [1, 2, 3]
    assert [v.task for v in registry.lineage(RUN, 2)] == ["task0", "task1"]


def test_read_shards_returns_the_committed_bytes_in_task_order(registry, committed, trained):
    assert registry.read_shards(RUN, 3) == trained[1]


def test_unknown_run_and_version(registry, committed):
    assert registry.versions("never-committed") == [] and registry.latest("never-committed") is None
    with pytest.raises(VersionNotFoundError, match=f"run {RUN}: version 4 does not exist"):
        registry.version(RUN, 4)
    with pytest.raises(VersionNotFoundError):
        registry.version(RUN, 0)


def test_recommitting_the_same_content_is_a_no_op(registry, committed, trained):
    _, shards, _, _, _ = trained
    again = registry.commit(RUN, shards[1], base_model=BASE, metrics={"accuracy": 51.0, "task": 1})
    assert again == committed[1]  # the stored version itself, creation time included
    assert registry.versions(RUN) == [1, 2, 3]


def test_reexported_shard_with_the_same_atoms_is_the_same_content(registry):
    # safetensors does not fix the order of header entries, so two exports of the same atoms may
    # differ in bytes; the registry compares moram's content checksum, not the file hash
    first = registry.commit(RUN, synthetic_shard("a", 0, seed=3), base_model=BASE)
    assert registry.commit(RUN, synthetic_shard("a", 0, seed=3), base_model=BASE) == first


@pytest.mark.parametrize("change", ["shard", "metrics", "base_model"])
def test_recommitting_different_content_is_a_conflict(registry, change):
    first = registry.commit(RUN, synthetic_shard("a", 0), base_model=BASE, metrics={"accuracy": 1.0})
    shard = synthetic_shard("a", 0, seed=1 if change == "shard" else 0)
    metrics = {"accuracy": 2.0 if change == "metrics" else 1.0}
    base = BaseModelRef("other-model") if change == "base_model" else BASE
    with pytest.raises(CommitConflictError, match=rf"run {RUN}: task 0 \(a\) is already committed as version 1 "
                                                  rf"with different {change}"):
        registry.commit(RUN, shard, base_model=base, metrics=metrics)
    assert registry.versions(RUN) == [1] and registry.version(RUN, 1) == first


def test_a_task_needs_its_parent_version(registry):
    with pytest.raises(CommitError, match="parent version 1 does not exist"):
        registry.commit(RUN, synthetic_shard("b", 1), base_model=BASE)
    assert registry.storage.children("") == []  # refused before anything was written


def test_a_run_keeps_one_base_model(registry):
    registry.commit(RUN, synthetic_shard("a", 0), base_model=BASE)
    with pytest.raises(CommitError, match="a run keeps one base model and method"):
        registry.commit(RUN, synthetic_shard("b", 1), base_model="another-model")


def test_commit_refuses_bytes_that_are_not_a_moram_shard(registry):
    with pytest.raises(ShardIntegrityError, match=f"run {RUN}: the shard to commit is not a valid MoRAM shard"):
        registry.commit(RUN, b"\x00" * 64, base_model=BASE)
    with pytest.raises(ShardIntegrityError):
        registry.commit(RUN, synthetic_shard("a", 0)[:-5], base_model=BASE)


def test_metrics_must_be_json(registry):
    with pytest.raises(ManifestError, match="metrics"):
        registry.commit(RUN, synthetic_shard("a", 0), base_model=BASE, metrics={"accuracy": float("nan")})
    assert registry.versions(RUN) == []


def test_concurrent_commits_of_one_task_have_exactly_one_winner(registry_uri):
    writers = 4
    shards = [synthetic_shard("a", 0, seed=i) for i in range(writers)]
    barrier, outcomes = threading.Barrier(writers), {}

    def commit(index):
        registry = Registry(registry_uri)  # its own client, like another process
        barrier.wait()
        try:
            outcomes[index] = registry.commit(RUN, shards[index], base_model=BASE)
        except CommitConflictError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    assert len(winners) == 1 and len(outcomes) == writers
    stored = Registry(registry_uri).verify(RUN, 1)
    assert stored == outcomes[winners[0]]
    assert stored.shard.sha256 == hashlib.sha256(shards[winners[0]]).hexdigest()


def test_concurrent_identical_commits_all_return_the_one_version(registry_uri):
    shard, results = synthetic_shard("a", 0), []
    barrier = threading.Barrier(3)

    def commit():
        registry = Registry(registry_uri)
        barrier.wait()
        results.append(registry.commit(RUN, shard, base_model=BASE))

    threads = [threading.Thread(target=commit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(result == results[0] for result in results)


# -- names are checked before any I/O ----------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def unusable_registry(request, tmp_path, monkeypatch):
    """A registry whose every storage operation fails: a name error proves no I/O happened."""
    if request.param == "local":
        (tmp_path / "a-file").write_text("")
        return Registry(tmp_path / "a-file" / "registry")
    request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens
    return Registry(S3Storage("moram-tests", "unusable"))


BAD_NAMES = ["", "..", "a/b", "a\\b", "../other-run", "x/../y"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_run_names_are_rejected_before_any_io(unusable_registry, name):
    with pytest.raises(InvalidNameError):
        unusable_registry.commit(name, synthetic_shard("a", 0), base_model=BASE)
    for read in (unusable_registry.versions, unusable_registry.latest):
        with pytest.raises(InvalidNameError):
            read(name)
    for read in (unusable_registry.version, unusable_registry.lineage, unusable_registry.read_shards,
                 unusable_registry.verify):
        with pytest.raises(InvalidNameError):
            read(name, 1)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_task_names_are_rejected_before_any_io(unusable_registry, name):
    with pytest.raises(InvalidNameError):
        unusable_registry.commit(RUN, synthetic_shard(name, 0), base_model=BASE)


def test_the_unusable_registry_really_fails_on_io(unusable_registry):
    with pytest.raises(StorageError):
        unusable_registry.commit(RUN, synthetic_shard("a", 0), base_model=BASE)


# -- damaged shards ----------------------------------------------------------------------------
def damage(registry, version, kind):
    key = shard_key(RUN, version.shard.sha256)
    data = registry.storage.read(key)
    if kind == "flipped-byte":
        registry.storage.write(key, data[:1000] + bytes([data[1000] ^ 0x01]) + data[1001:])
    elif kind == "truncated":
        registry.storage.write(key, data[: len(data) // 2])
    else:
        registry.storage.delete(key)
    return key


@pytest.mark.parametrize("kind", ["flipped-byte", "truncated", "missing"])
def test_damaged_shard_is_refused_naming_shard_and_version(registry, committed, kind, tmp_path):
    key = damage(registry, committed[1], kind)  # task 1's shard: part of versions 2 and 3
    expected = {"flipped-byte": "corrupted", "truncated": "truncated", "missing": "missing"}[kind]
    for read in (registry.verify, registry.read_shards,
                 lambda run, v: registry.load(run, v, tiny_llama(seed=0)),
                 lambda run, v: registry.export(run, v, tmp_path / f"export-{v}")):
        with pytest.raises(ShardIntegrityError) as caught:
            read(RUN, 3)
        message = str(caught.value)
        assert f"run {RUN} version 3" in message and key in message and expected in message
    registry.verify(RUN, 1)  # version 1 does not contain that shard
    assert not (tmp_path / "export-3" / "manifest.json").exists()


def test_verify_names_every_bad_shard(registry, committed):
    first, second = damage(registry, committed[0], "missing"), damage(registry, committed[2], "truncated")
    with pytest.raises(ShardIntegrityError) as caught:
        registry.verify(RUN, 3)
    assert first in str(caught.value) and second in str(caught.value)


# -- damaged manifests -------------------------------------------------------------------------
def break_manifest(registry, how):
    key = manifest_key(RUN, 2)
    manifest = json.loads(registry.storage.read(key))
    if how == "not-json":
        registry.storage.write(key, b'{"schema_version": 1, "run_id": ')
        return "not valid JSON"
    if how == "lacks-field":
        del manifest["shards"]
        registry.storage.write(key, json.dumps(manifest).encode())
        return "lacks the field 'shards'"
    if how == "newer-schema":
        manifest["schema_version"] = SCHEMA_VERSION + 1
        registry.storage.write(key, json.dumps(manifest).encode())
        return f"schema version {SCHEMA_VERSION + 1} is newer"
    manifest["config"]["no_such_knob"] = 1  # bad-config: fails only when the config is used
    registry.storage.write(key, json.dumps(manifest).encode())
    return "invalid method config"


@pytest.mark.parametrize("how", ["not-json", "lacks-field", "newer-schema"])
def test_broken_manifest_is_a_clear_error(registry, committed, how):
    expected = break_manifest(registry, how)
    for read in (registry.version, registry.verify, registry.read_shards, registry.lineage,
                 lambda run, v: registry.load(run, v, tiny_llama(seed=0))):
        with pytest.raises(ManifestError, match=expected) as caught:
            read(RUN, 2)
        assert f"run {RUN} version 2" in str(caught.value)
    with pytest.raises(ManifestError):
        registry.lineage(RUN, 3)  # reaching it through a parent pointer fails the same way
    assert registry.latest(RUN) == committed[2]  # other versions stay readable


def test_manifest_with_an_unusable_config_fails_before_torch_sees_it(registry, committed):
    expected = break_manifest(registry, "bad-config")
    with pytest.raises(ManifestError, match=expected):
        registry.load(RUN, 2, tiny_llama(seed=0))


def test_manifest_at_the_wrong_key_is_rejected(registry, committed):
    registry.storage.write(manifest_key(RUN, 3), registry.storage.read(manifest_key(RUN, 2)))
    with pytest.raises(ManifestError, match="records run 'run-1' version 2"):
        registry.version(RUN, 3)


# -- loading, views ----------------------------------------------------------------------------
def test_load_rebuilds_the_trained_model(registry, committed, trained):
    model, _, _, probe, reference = trained
    loaded = registry.load(RUN, 3, tiny_llama(seed=0))
    assert loaded.atom_counts() == model.atom_counts()
    assert loaded.task_names == ["task0", "task1", "task2"]
    torch.testing.assert_close(logits(loaded, probe), reference, rtol=0, atol=0)


def test_load_an_earlier_version(registry, committed, trained):
    _, _, reports, probe, reference = trained
    loaded = registry.load(RUN, 1, tiny_llama(seed=0))
    assert loaded.task_names == ["task0"]
    assert loaded.atom_counts() == reports[0].kept
    assert not torch.allclose(logits(loaded, probe), reference)


def test_delta_view_changes_routing_not_storage(registry, committed, trained):
    _, _, _, probe, reference = trained
    before = registry.storage.read(manifest_key(RUN, 3))
    viewed = registry.load(RUN, 3, tiny_llama(seed=0), delta=0.9)
    assert {layer.delta for layer in viewed.moram_layers.values()} == {0.9}
    assert not torch.allclose(logits(viewed, probe), reference)
    assert registry.storage.read(manifest_key(RUN, 3)) == before
    registry.verify(RUN, 3)
    torch.testing.assert_close(logits(registry.load(RUN, 3, tiny_llama(seed=0)), probe), reference, rtol=0, atol=0)


def test_pruning_view_keeps_fewer_atoms_without_touching_storage(registry, committed, trained):
    model, _, _, _, _ = trained
    full = model.atom_counts()
    pruned = registry.load(RUN, 3, tiny_llama(seed=0), prune_mass=0.5).atom_counts()
    assert all(pruned[name] <= full[name] for name in full)
    assert sum(pruned.values()) < sum(full.values())
    registry.verify(RUN, 3)
    assert registry.load(RUN, 3, tiny_llama(seed=0)).atom_counts() == full


def test_bad_view_values_name_the_knob(registry, committed):
    with pytest.raises(ValueError, match="delta"):
        registry.load(RUN, 3, tiny_llama(seed=0), delta=1.5)


# -- export ------------------------------------------------------------------------------------
def test_export_writes_manifest_and_shards(registry, committed, trained, tmp_path):
    dest = registry.export(RUN, 2, tmp_path / "v2")
    manifest = json.loads((dest / "manifest.json").read_bytes())
    assert manifest == committed[1].to_manifest()
    for entry, shard in zip(manifest["shards"], trained[1][:2]):
        assert (dest / "shards" / f"{entry['sha256']}.safetensors").read_bytes() == shard
    with pytest.raises(FileExistsError, match="not an empty folder"):
        registry.export(RUN, 2, dest)


# -- the S3 server dies in the middle of a commit ------------------------------------------------
@pytest.mark.parametrize("phase", ["shard-upload", "manifest-put"])
def test_commit_survives_the_s3_server_stopping_mid_commit(restartable_s3, phase):
    registry = Registry(f"s3://moram-tests/mid-commit-{phase}")
    registry.commit(RUN, synthetic_shard("a", 0), base_model=BASE)
    shard = synthetic_shard("b", 1, num_layers=8, width=256)

    def stop_server(params, **_):
        # the manifest is the only conditional put; the shard upload is a plain one
        if ("IfNoneMatch" in params) == (phase == "manifest-put") and restartable_s3.running:
            restartable_s3.stop()

    registry.storage.client.meta.events.register("provide-client-params.s3.PutObject", stop_server)
    with pytest.raises(StorageError) as caught:
        registry.commit(RUN, shard, base_model=BASE)
    registry.storage.client.meta.events.unregister("provide-client-params.s3.PutObject", stop_server)
    expected_key = manifest_key(RUN, 2) if phase == "manifest-put" else "/shards/"
    assert f"run {RUN}: commit of task 1 (b) as version 2 failed" in str(caught.value)
    assert expected_key in str(caught.value)
    shown = "".join(traceback.format_exception(caught.value))
    assert restartable_s3.secret_key not in shown and restartable_s3.access_key not in shown

    restartable_s3.start()
    assert registry.versions(RUN) == [1]  # nothing half-written became visible
    version = registry.commit(RUN, shard, base_model=BASE)  # the same commit, same registry object
    assert version.version == 2 and registry.verify(RUN, 2) == version
