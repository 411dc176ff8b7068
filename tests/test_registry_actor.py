"""The per-run registry actor on a real local Ray runtime, over both backends: one named detached
actor per run, and killing it (between or during commits) loses nothing and shows nothing half-written."""
import hashlib
import time
import uuid

import pytest
import ray

from moram_platform.registry import (BaseModelRef, CommitConflictError, Registry, RegistryError, open_storage,
                                     shard_key)
from moram_platform.registry.actor import NAMESPACE, actor_name, get_registry_actor
from moram_platform.testing.shards import synthetic_shard

pytestmark = pytest.mark.timeout(180)

BASE = BaseModelRef("tiny-llama", revision="seed0")


@pytest.fixture(scope="module")
def ray_runtime(s3_server):
    """One Ray runtime for the module, started after the S3 variables are set so workers see them."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"  # actors outlive tests: one name per test


def restarted(handle, old_pid: int, timeout: float = 60.0) -> int:
    """Wait until the actor answers from a new process; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = ray.get(handle.describe.remote(), timeout=10)["pid"]
            if pid != old_pid:
                return pid
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError("the registry actor did not come back")


def assert_every_version_whole(uri: str, run_id: str) -> list[int]:
    registry = Registry(uri)
    numbers = registry.versions(run_id)
    assert numbers == list(range(1, len(numbers) + 1))
    for number in numbers:
        registry.verify(run_id, number)
    return numbers


def test_one_named_actor_per_run(ray_runtime, registry_uri, run_id):
    first = get_registry_actor(registry_uri, run_id)
    second = get_registry_actor(registry_uri, run_id)
    assert first._actor_id == second._actor_id
    assert ray.get_actor(actor_name(run_id), namespace=NAMESPACE)._actor_id == first._actor_id
    info = ray.get(first.describe.remote())
    assert info["uri"] == open_storage(registry_uri).uri and info["run_id"] == run_id
    other_run = get_registry_actor(registry_uri, run_id + "-other")
    assert other_run._actor_id != first._actor_id


def test_an_actor_serves_one_registry(ray_runtime, registry_uri, run_id, tmp_path):
    get_registry_actor(registry_uri, run_id)
    with pytest.raises(RegistryError, match="already serves"):
        get_registry_actor(str(tmp_path / "another-registry"), run_id)


def test_commit_and_read_through_the_actor(ray_runtime, registry_uri, run_id):
    actor = get_registry_actor(registry_uri, run_id)
    shards = [synthetic_shard(f"t{i}", i, seed=i) for i in range(2)]
    committed = [ray.get(actor.commit.remote(shard, base_model=BASE, metrics={"i": i}))
                 for i, shard in enumerate(shards)]
    assert [v.version for v in committed] == [1, 2]
    direct = Registry(registry_uri)
    assert ray.get(actor.latest.remote()) == direct.latest(run_id) == committed[1]
    assert ray.get(actor.versions.remote()) == [1, 2]
    assert ray.get(actor.lineage.remote(2)) == committed
    assert ray.get(actor.read_shards.remote(2)) == shards
    assert ray.get(actor.verify.remote(2)) == committed[1]


def test_errors_reach_the_caller_as_registry_errors(ray_runtime, registry_uri, run_id):
    actor = get_registry_actor(registry_uri, run_id)
    ray.get(actor.commit.remote(synthetic_shard("a", 0), base_model=BASE))
    with pytest.raises(CommitConflictError, match="already committed as version 1"):
        ray.get(actor.commit.remote(synthetic_shard("a", 0, seed=5), base_model=BASE))


@pytest.mark.slow   # a fault drill: the actor's process is killed and restarted by Ray (13-18 s each)
def test_killed_between_commits_loses_nothing(ray_runtime, registry_uri, run_id):
    actor = get_registry_actor(registry_uri, run_id)
    for i in range(2):
        ray.get(actor.commit.remote(synthetic_shard(f"t{i}", i, seed=i), base_model=BASE))
    pid = ray.get(actor.describe.remote())["pid"]

    ray.kill(actor, no_restart=False)
    restarted(actor, pid)
    assert ray.get(actor.versions.remote()) == [1, 2]
    assert ray.get(actor.latest.remote()).task == "t1"
    assert assert_every_version_whole(registry_uri, run_id) == [1, 2]
    third = ray.get(actor.commit.remote(synthetic_shard("t2", 2, seed=2), base_model=BASE))
    assert third.version == 3 and third.parent_version == 2


def kill_when(actor, moment: str, storage, shard_key_: str) -> None:
    """Kill the actor right away, once the new shard is in storage (so, before its manifest is),
    or a little later."""
    if moment == "shard-written":
        deadline = time.monotonic() + 30
        while not storage.exists(shard_key_) and time.monotonic() < deadline:
            time.sleep(0.002)
    elif moment == "later":
        time.sleep(0.15)
    ray.kill(actor, no_restart=False)


@pytest.mark.slow   # a fault drill: the actor's process is killed and restarted by Ray (13-18 s each)
def test_killed_during_commits_shows_nothing_half_written(ray_runtime, registry_uri, run_id):
    actor = get_registry_actor(registry_uri, run_id)
    ray.get(actor.commit.remote(synthetic_shard("t0", 0), base_model=BASE))
    storage = open_storage(registry_uri)
    # a few MB per shard, so a commit takes a moment to write
    shards = [synthetic_shard(f"t{i}", i, num_layers=8, width=1024, r=8, seed=i) for i in (1, 2, 3)]
    for shard, moment in zip(shards, ("at-once", "shard-written", "later")):
        pid = ray.get(actor.describe.remote())["pid"]
        pending = actor.commit.remote(shard, base_model=BASE)
        kill_when(actor, moment, storage, shard_key(run_id, hashlib.sha256(shard).hexdigest()))
        restarted(actor, pid)
        assert_every_version_whole(registry_uri, run_id)
        try:
            ray.get(pending)  # Ray retries calls in flight on the restarted actor
        except ray.exceptions.RayActorError:
            pass  # or it gave up: the caller commits again, which is safe
        again = ray.get(actor.commit.remote(shard, base_model=BASE))
        assert again == Registry(registry_uri).verify(run_id, again.version)
    assert assert_every_version_whole(registry_uri, run_id) == [1, 2, 3, 4]


def test_concurrent_commits_through_the_actor_have_one_winner(ray_runtime, registry_uri, run_id):
    actor = get_registry_actor(registry_uri, run_id)
    pending = [actor.commit.remote(synthetic_shard("a", 0, seed=i), base_model=BASE) for i in range(3)]
    outcomes = []
    for ref in pending:
        try:
            outcomes.append(ray.get(ref))
        except CommitConflictError as error:
            outcomes.append(error)
    winners = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(winners) == 1 and Registry(registry_uri).version(run_id, 1) == winners[0]


@ray.remote(num_cpus=1)
def commit_at(uri: str, run_id: str, shard: bytes, start_at: float):
    """A separate worker process committing straight to storage, starting at a shared instant."""
    registry = Registry(uri)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        return registry.commit(run_id, shard, base_model=BASE)
    except CommitConflictError as error:
        return str(error)


def test_two_processes_committing_the_same_task_have_one_winner(ray_runtime, registry_uri, run_id):
    start_at = time.time() + 4  # both workers are up by then
    shards = [synthetic_shard("a", 0, seed=i) for i in range(2)]
    outcomes = ray.get([commit_at.remote(registry_uri, run_id, shard, start_at) for shard in shards])
    winners = [o for o in outcomes if not isinstance(o, str)]
    losers = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and len(losers) == 1
    assert "already committed as version 1" in losers[0]
    assert Registry(registry_uri).verify(run_id, 1) == winners[0]
