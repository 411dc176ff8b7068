"""A named, detached Ray actor per run that fronts the registry for the driver and train workers.

    registry = get_registry_actor("s3://bucket/moram", "trace-run")    # same handle everywhere
    version = ray.get(registry.commit.remote(model.export_shard(), base_model=BaseModelRef(...)))
    shards = ray.get(registry.read_shards.remote(version.version))     # -> model.load_shards(shards)

The actor holds nothing but its constructor arguments (URI, run id): every answer is read from
storage. Killed at any moment, Ray restarts it (max_restarts) and it has lost nothing; calls in
flight are retried, which is safe because commits are idempotent per (run, task).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ray

from .errors import RegistryError
from .manifest import BaseModelRef, Version
from .names import check_name
from .registry import Registry
from .storage import open_storage

NAMESPACE = "moram"


def actor_name(run_id: str) -> str:
    return f"moram-registry:{check_name('run', run_id)}"


class RegistryActor:
    """The registry of one run, served to every process of a Ray cluster."""

    def __init__(self, uri: str, run_id: str):
        self._run_id = check_name("run", run_id)
        self._registry = Registry(uri)

    def describe(self) -> dict[str, Any]:
        """What this actor serves, and the process serving it (changes when Ray restarts it)."""
        return {"uri": self._registry.uri, "run_id": self._run_id, "pid": os.getpid()}

    def commit(self, shard: bytes, *, base_model: BaseModelRef | str,
               metrics: Mapping[str, Any] | None = None) -> Version:
        return self._registry.commit(self._run_id, shard, base_model=base_model, metrics=metrics)

    def versions(self) -> list[int]:
        return self._registry.versions(self._run_id)

    def latest(self) -> Version | None:
        return self._registry.latest(self._run_id)

    def version(self, version: int) -> Version:
        return self._registry.version(self._run_id, version)

    def lineage(self, version: int) -> list[Version]:
        return self._registry.lineage(self._run_id, version)

    def read_shards(self, version: int) -> list[bytes]:
        return self._registry.read_shards(self._run_id, version)

    def verify(self, version: int) -> Version:
        return self._registry.verify(self._run_id, version)


_RemoteRegistryActor = ray.remote(RegistryActor)


def get_registry_actor(uri: str, run_id: str, *, namespace: str = NAMESPACE, max_restarts: int = -1,
                       max_task_retries: int = 3):
    """The run's registry actor: created on first use, the existing one afterwards (from any
    process of the cluster). Needs ``ray.init()`` first.

    Local paths are made absolute, so the actor resolves them the same way wherever it runs.
    Raises RegistryError if an actor for this run already serves a different registry URI.
    """
    uri = open_storage(uri).uri  # canonical form; checks the URI before anything starts
    remote = _RemoteRegistryActor.options(
        name=actor_name(run_id), namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=max_restarts, max_task_retries=max_task_retries,
        max_concurrency=4,  # reads need not queue behind a commit; storage arbitrates commits
        num_cpus=0,         # it waits on I/O; the CPUs belong to the train workers
        # A detached actor must outlive the caller's placement group (a Tune trial's, say).
        scheduling_strategy="DEFAULT",
    )
    handle = remote.remote(uri, run_id)
    served = ray.get(handle.describe.remote())["uri"]
    if served != uri:
        raise RegistryError(f"run {run_id}: its registry actor {actor_name(run_id)!r} already serves {served}, "
                            f"not {uri}; use one registry per run id")
    return handle
