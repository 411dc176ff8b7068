"""The memory registry: versions of a continual-learning run's rank-1 atoms in object storage.

    registry = Registry("s3://bucket/moram")               # or a path; default $MORAM_REGISTRY_URI
    version = registry.commit("trace-run", model.export_shard(),
                              base_model=BaseModelRef("HuggingFaceTB/SmolLM2-135M", fingerprint),
                              metrics={"accuracy": 61.5})
    model = registry.load("trace-run", version.version, fresh_base_model, delta=0.3)

Commit protocol: the shard is written and read back (size + sha256), then the manifest is
created with a create-only put, so a version is visible whole or not at all and of two
writers of the same task exactly one wins. Commits are idempotent per (run, task).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import (CommitConflictError, CommitError, ManifestError, ObjectNotFoundError, ShardIntegrityError,
                     StorageError, VersionNotFoundError)
from .faults import fault_point
from .layout import manifest_key, shard_key, version_from_name, versions_prefix
from .manifest import BaseModelRef, ShardRef, Version, check_metrics
from .names import check_name
from .storage import Storage, open_storage

if TYPE_CHECKING:
    from torch import nn

    from moram import MoRAMModel

REGISTRY_URI_ENV = "MORAM_REGISTRY_URI"
DEFAULT_REGISTRY_URI = "moram_runs"


def default_registry_uri() -> str:
    """$MORAM_REGISTRY_URI, else the local folder ./moram_runs (the embedded default)."""
    return os.environ.get(REGISTRY_URI_ENV) or DEFAULT_REGISTRY_URI


@dataclass(frozen=True)
class _ShardInfo:
    """What a commit takes from the shard's own metadata (the shard is the source of truth)."""

    task: str
    task_index: int
    method: str
    mode: str
    config: dict[str, Any]
    pruning: dict[str, Any]
    content_sha256: str


class Registry:
    """Versions of runs in one storage root. Holds no state beyond its storage handle, so any
    number of processes may use the same root at once."""

    def __init__(self, uri: str | os.PathLike | Storage | None = None):
        if isinstance(uri, Storage):
            self.storage = uri
        else:
            self.storage = open_storage(uri if uri is not None else default_registry_uri())

    @property
    def uri(self) -> str:
        return self.storage.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # -- writing ---------------------------------------------------------------------------
    def commit(self, run_id: str, shard: bytes, *, base_model: BaseModelRef | str,
               metrics: Mapping[str, Any] | None = None) -> Version:
        """Commit one task's shard as the next version of ``run_id`` and return that version.

        The task (name, index), method, config and pruning record come from the shard's own
        metadata; task i becomes version i + 1 and needs version i as its parent. Committing the
        same content again returns the existing version; different content for an already
        committed task raises CommitConflictError.
        """
        check_name("run", run_id)
        base = BaseModelRef(base_model) if isinstance(base_model, str) else base_model
        info = _inspect_shard(run_id, shard)
        check_name("task", info.task)
        number = info.task_index + 1
        metrics = check_metrics(dict(metrics or {}), f"run {run_id} version {number}")
        ref = ShardRef(task=info.task, task_index=info.task_index, sha256=hashlib.sha256(shard).hexdigest(),
                       size=len(shard), content_sha256=info.content_sha256, mode=info.mode)

        existing = self._find(run_id, number)
        if existing is not None:  # a retry or a re-run: a no-op if the content is the same
            return _same_commit_or_conflict(existing, _candidate(run_id, number, existing.shards[:-1],
                                                                 info, ref, base, metrics))
        parent = self._parent(run_id, number, base, info)
        candidate = _candidate(run_id, number, parent.shards if parent else (), info, ref, base, metrics)
        try:
            self.storage.write(shard_key(run_id, ref.sha256), shard)
            _, problem = self._fetch_shard(run_id, number, ref)  # read back what the backend stored
            if problem:
                raise CommitError(f"commit aborted, nothing became visible: {problem}")
            fault_point("before-manifest", number)      # tests only: $MORAM_FAULT_IN_COMMIT
            created = self.storage.create(manifest_key(run_id, number), candidate.to_json())
            fault_point("after-manifest", number)
        except StorageError as error:
            raise type(error)(f"run {run_id}: commit of task {info.task_index} ({info.task}) as version {number} "
                              f"failed (committing the same shard again is safe): {error}") from None
        if created:
            return candidate
        return _same_commit_or_conflict(self.version(run_id, number), candidate)

    def _find(self, run_id: str, number: int) -> Version | None:
        try:
            return self.version(run_id, number)
        except VersionNotFoundError:
            return None

    def _parent(self, run_id: str, number: int, base: BaseModelRef, info: _ShardInfo) -> Version | None:
        if number == 1:
            return None
        parent = self._find(run_id, number - 1)
        if parent is None:
            raise CommitError(f"run {run_id}: cannot commit task {info.task_index} ({info.task}) as version "
                              f"{number}: its parent version {number - 1} does not exist; commit task "
                              f"{info.task_index - 1} first")
        if parent.base_model != base or parent.method != info.method:
            raise CommitError(
                f"run {run_id}: task {info.task_index} ({info.task}) uses base model {base.id!r} "
                f"(revision {base.revision!r}) and method {info.method!r}, but its parent version "
                f"{parent.version} uses {parent.base_model.id!r} (revision {parent.base_model.revision!r}) "
                f"and {parent.method!r}; a run keeps one base model and method")
        return parent

    # -- reading ---------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Run ids under this root."""
        return [name for name in self.storage.children("") if _is_valid_name(name)]

    def versions(self, run_id: str) -> list[int]:
        """Committed version numbers of a run, ascending (empty for an unknown run)."""
        names = self.storage.children(versions_prefix(run_id))
        return sorted(n for n in map(version_from_name, names) if n is not None)

    def latest(self, run_id: str) -> Version | None:
        """The newest version of a run, None if it has none."""
        numbers = self.versions(run_id)
        return self.version(run_id, numbers[-1]) if numbers else None

    def version(self, run_id: str, version: int) -> Version:
        """One version, read from its manifest and checked."""
        check_name("run", run_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise VersionNotFoundError(f"run {run_id}: versions are numbered from 1, got {version!r}")
        key = manifest_key(run_id, version)
        try:
            data = self.storage.read(key)
        except ObjectNotFoundError:
            raise VersionNotFoundError(f"run {run_id}: version {version} does not exist in {self.uri}") from None
        where = f"run {run_id} version {version} ({self.storage.where(key)})"
        parsed = Version.from_json(data, where)
        _check_placement(parsed, run_id, version, where)
        return parsed

    def lineage(self, run_id: str, version: int) -> list[Version]:
        """The version and its ancestors, oldest first."""
        chain = [self.version(run_id, version)]
        while chain[-1].parent_version is not None:
            chain.append(self.version(run_id, chain[-1].parent_version))
        return chain[::-1]

    def read_shards(self, run_id: str, version: int) -> list[bytes]:
        """The version's shards in task order, each checked against its manifest size and sha256."""
        found = self.version(run_id, version)
        return [self._read_checked(found, ref) for ref in found.shards]

    def verify(self, run_id: str, version: int) -> Version:
        """Check every shard of a version (presence, size, sha256); raise one ShardIntegrityError
        naming every bad shard, else return the version."""
        found = self.version(run_id, version)
        problems = [p for ref in found.shards if (p := self._fetch_shard(run_id, version, ref)[1])]
        if problems:
            raise ShardIntegrityError("; ".join(problems))
        return found

    def load(self, run_id: str, version: int, base_model: "nn.Module", *, delta: float | None = None,
             prune_mass: float | None = None) -> "MoRAMModel":
        """Base model + the version's atoms, as a MoRAMModel (``base_model`` is wrapped in place).

        ``delta`` and ``prune_mass`` are views, not copies: they change how the stored atoms are
        used at load time (δ threshold of Eq. 8; keep each task's atoms covering that share of
        its recorded activation mass) and leave storage untouched.
        """
        from moram import MoRAMConfig, MoRAMConfigError, ShardError, get_moram_model, read_shard

        found = self.version(run_id, version)
        shards = []
        for ref in found.shards:
            name = self.storage.where(shard_key(run_id, ref.sha256))
            try:
                shards.append(read_shard(self._read_checked(found, ref), name=name))
            except ShardError as error:
                raise ShardIntegrityError(f"run {run_id} version {version}: {error}") from None
        try:
            config = MoRAMConfig.from_dict(found.config)
        except (MoRAMConfigError, TypeError) as error:
            raise ManifestError(f"run {run_id} version {version}: invalid method config: {error}") from None
        views = {key: value for key, value in {"delta": delta, "prune_mass": prune_mass}.items() if value is not None}
        model = get_moram_model(base_model, config.replace(**views))
        model.load_shards(shards, prune_mass=prune_mass)
        return model

    def export(self, run_id: str, version: int, dest: str | os.PathLike) -> Path:
        """Copy a verified version into a local folder: ``manifest.json`` and
        ``shards/<sha256>.safetensors``. ``dest`` must be absent or empty."""
        found = self.version(run_id, version)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"export of run {run_id} version {version}: {dest} exists and is not an empty folder")
        blobs = [self._read_checked(found, ref) for ref in found.shards]
        (dest / "shards").mkdir(parents=True, exist_ok=True)
        for ref, data in zip(found.shards, blobs):
            (dest / "shards" / f"{ref.sha256}.safetensors").write_bytes(data)
        (dest / "manifest.json").write_bytes(found.to_json())  # last: its presence marks a complete export
        return dest

    # -- shard integrity -------------------------------------------------------------------
    def _fetch_shard(self, run_id: str, version: int, ref: ShardRef) -> tuple[bytes | None, str | None]:
        """(bytes or None if missing, what is wrong with them or None)."""
        key = shard_key(run_id, ref.sha256)
        try:
            data = self.storage.read(key)
        except ObjectNotFoundError:
            data = None
        return data, _describe_problem(self.storage.where(key), run_id, version, ref, data)

    def _read_checked(self, version: Version, ref: ShardRef) -> bytes:
        data, problem = self._fetch_shard(version.run_id, version.version, ref)
        if problem:
            raise ShardIntegrityError(problem)
        return data


def _describe_problem(where: str, run_id: str, version: int, ref: ShardRef, data: bytes | None) -> str | None:
    """None if ``data`` is the shard the manifest records, else what is wrong with it."""
    shard = f"run {run_id} version {version}: shard {where} (task {ref.task_index} {ref.task})"
    if data is None:
        return f"{shard} is missing"
    if len(data) != ref.size:
        kind = "truncated" if len(data) < ref.size else "longer than recorded"
        return f"{shard} is {kind}: {len(data)} bytes, the manifest records {ref.size}"
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        return f"{shard} is corrupted: its sha256 does not match the manifest"
    return None


def _inspect_shard(run_id: str, shard: bytes) -> _ShardInfo:
    """Parse the shard to commit (moram checks its inner content checksum) and take its metadata."""
    from moram import ShardError, read_shard

    if not isinstance(shard, (bytes, bytearray)):
        raise TypeError(f"run {run_id}: commit() takes the shard as bytes (MoRAMModel.export_shard()), "
                        f"got {type(shard).__name__}")
    try:
        parsed = read_shard(bytes(shard), name="<shard to commit>")
    except ShardError as error:
        raise ShardIntegrityError(f"run {run_id}: the shard to commit is not a valid MoRAM shard: {error}") from None
    meta = parsed.metadata
    task_index = meta["task_index"]
    if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
        raise ShardIntegrityError(f"run {run_id}: the shard to commit has an invalid task_index {task_index!r}")
    kept = parsed.atom_counts
    added = meta.get("added") or {}
    layers = {name: [int(added.get(name, count)), count] for name, count in kept.items()}
    pruning = {
        "prune_mass": meta["config"].get("prune_mass"),
        "atoms_added": sum(a for a, _ in layers.values()),
        "atoms_kept": sum(k for _, k in layers.values()),
        "layers": layers,
    }
    return _ShardInfo(task=meta["task"], task_index=task_index, method=meta["method"], mode=meta["mode"],
                      config=meta["config"], pruning=pruning, content_sha256=meta["content_sha256"])


def _candidate(run_id: str, number: int, parent_shards: tuple[ShardRef, ...], info: _ShardInfo, ref: ShardRef,
               base: BaseModelRef, metrics: dict[str, Any]) -> Version:
    return Version(
        run_id=run_id, version=number, parent_version=number - 1 if number > 1 else None,
        task=info.task, task_index=info.task_index, base_model=base, method=info.method, config=info.config,
        shards=tuple(parent_shards) + (ref,), metrics=metrics, pruning=info.pruning,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )


def _same_commit_or_conflict(existing: Version, candidate: Version) -> Version:
    differences = existing.content_differences(candidate)
    if not differences:
        return existing
    raise CommitConflictError(
        f"run {existing.run_id}: task {candidate.task_index} ({candidate.task}) is already committed as "
        f"version {existing.version} with different {', '.join(differences)} (stored shard "
        f"{existing.shard.sha256[:12]}, new shard {candidate.shard.sha256[:12]}); versions are immutable: "
        "use a new run id to train it differently")


def _check_placement(version: Version, run_id: str, number: int, where: str) -> None:
    """A manifest must describe the version its key names, with one shard per task."""
    if version.run_id != run_id or version.version != number:
        raise ManifestError(f"{where}: the manifest records run {version.run_id!r} version {version.version}")
    expected_parent = number - 1 if number > 1 else None
    if (version.parent_version != expected_parent or len(version.shards) != number
            or version.task_index != number - 1 or version.shard.task_index != version.task_index):
        raise ManifestError(f"{where}: inconsistent manifest (parent {version.parent_version}, "
                            f"{len(version.shards)} shards, task index {version.task_index})")


def _is_valid_name(name: str) -> bool:
    try:
        check_name("run", name)
    except ValueError:
        return False
    return True
