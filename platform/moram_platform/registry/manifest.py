"""The version manifest: one small JSON document per version (schema below, see docs/registry.md).

    {
      "schema_version": 1,
      "run_id": "trace-smollm2", "version": 2, "parent_version": 1,
      "task": {"name": "FOMC", "index": 1},
      "base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "3f5b..."},
      "method": "moram", "config": {... MoRAMConfig.to_dict() of this task ...},
      "shards": [{"task": "C-STANCE", "task_index": 0, "sha256": "...", "size": 123,
                  "content_sha256": "...", "mode": "append"},
                 {"task": "FOMC", "task_index": 1, "sha256": "...", "size": 118,
                  "content_sha256": "...", "mode": "append"}],
      "metrics": {... this task's metrics ...},
      "pruning": {"prune_mass": 0.99, "atoms_added": 240, "atoms_kept": 201, "layers": {"<layer>": [8, 6]}},
      "created_at": "2026-01-31T12:00:00.000000Z"
    }

Version v holds tasks 0..v-1; its shards are its parent's plus the one its task added.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ManifestError

SCHEMA_VERSION = 1
SHARD_MODES = ("append", "replace")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BaseModelRef:
    """The base model a run fine-tunes: an id (hub name or path) and, where known, a revision
    or content hash (e.g. ``moram.model_fingerprint(path)``)."""

    id: str
    revision: str | None = None


@dataclass(frozen=True)
class ShardRef:
    """One task's shard as a manifest lists it. ``sha256`` and ``size`` are of the file (its
    storage key derives from the sha256); ``content_sha256`` is moram's checksum over the
    tensors, which stays the same when the same atoms are serialised again."""

    task: str
    task_index: int
    sha256: str
    size: int
    content_sha256: str
    mode: str = "append"


@dataclass(frozen=True)
class Version:
    """A committed version: immutable, parsed from (or written as) its manifest."""

    run_id: str
    version: int
    parent_version: int | None
    task: str
    task_index: int
    base_model: BaseModelRef
    method: str
    config: dict[str, Any]
    shards: tuple[ShardRef, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def shard(self) -> ShardRef:
        """The shard this version's task added."""
        return self.shards[-1]

    @property
    def size(self) -> int:
        return sum(ref.size for ref in self.shards)

    def content_differences(self, other: "Version") -> list[str]:
        """Fields whose values differ, creation time aside: empty means the same commit."""
        mine, theirs = self._identity(), other._identity()
        return [name for name in mine if mine[name] != theirs[name]]

    def _identity(self) -> dict[str, Any]:
        # safetensors writes header entries in no fixed order, so the same atoms exported twice
        # can differ in file bytes: a shard is identified by its content checksum instead.
        identity = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "created_at"}
        identity["shards"] = tuple((s.task, s.task_index, s.content_sha256, s.mode) for s in self.shards)
        return identity

    # -- JSON ------------------------------------------------------------------------------
    def to_manifest(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "version": self.version,
            "parent_version": self.parent_version,
            "task": {"name": self.task, "index": self.task_index},
            "base_model": {"id": self.base_model.id, "revision": self.base_model.revision},
            "method": self.method,
            "config": self.config,
            "shards": [{"task": s.task, "task_index": s.task_index, "sha256": s.sha256, "size": s.size,
                        "content_sha256": s.content_sha256, "mode": s.mode} for s in self.shards],
            "metrics": self.metrics,
            "pruning": self.pruning,
            "created_at": self.created_at,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_manifest(), indent=2, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Version":
        """Parse and check a manifest; ``where`` names it in every error message."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError) as error:
            raise ManifestError(f"{where}: manifest is not valid JSON ({error})") from None
        reader = _Reader(doc, where)
        schema = reader.get("schema_version", int)
        if schema > SCHEMA_VERSION:
            raise ManifestError(f"{where}: manifest schema version {schema} is newer than this registry "
                                f"supports ({SCHEMA_VERSION}); upgrade moram-platform to read it")
        if schema < 1:
            raise ManifestError(f"{where}: manifest schema version {schema} is invalid")
        task = _Reader(reader.get("task", dict), f"{where} task")
        base = _Reader(reader.get("base_model", dict), f"{where} base_model")
        return cls(
            run_id=reader.get("run_id", str),
            version=reader.get("version", int),
            parent_version=reader.get("parent_version", int, optional=True),
            task=task.get("name", str),
            task_index=task.get("index", int),
            base_model=BaseModelRef(id=base.get("id", str), revision=base.get("revision", str, optional=True)),
            method=reader.get("method", str),
            config=reader.get("config", dict),
            shards=tuple(_shard_ref(entry, f"{where} shards[{i}]")
                         for i, entry in enumerate(reader.get("shards", list))),
            metrics=reader.get("metrics", dict),
            pruning=reader.get("pruning", dict),
            created_at=reader.get("created_at", str),
            schema_version=schema,
        )


def _shard_ref(entry: Any, where: str) -> ShardRef:
    reader = _Reader(entry, where)
    ref = ShardRef(task=reader.get("task", str), task_index=reader.get("task_index", int),
                   sha256=reader.get("sha256", str), size=reader.get("size", int),
                   content_sha256=reader.get("content_sha256", str), mode=reader.get("mode", str))
    for name in ("sha256", "content_sha256"):
        if not _SHA256.fullmatch(getattr(ref, name)):
            raise ManifestError(f"{where}: {name} {getattr(ref, name)!r} is not a lowercase hex sha256")
    if ref.size < 0 or ref.mode not in SHARD_MODES:
        raise ManifestError(f"{where}: invalid size {ref.size} or mode {ref.mode!r}")
    return ref


class _Reader:
    """Typed access to a JSON object whose errors say which field of which manifest is wrong."""

    def __init__(self, doc: Any, where: str):
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        self.doc, self.where = doc, where

    def get(self, name: str, kind: type, optional: bool = False) -> Any:
        if name not in self.doc:
            raise ManifestError(f"{self.where}: manifest lacks the field {name!r}")
        value = self.doc[name]
        if value is None and optional:
            return None
        # bool is an int in Python, never in a manifest
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{self.where}: field {name!r} must be {kind.__name__}, got {value!r:.80}")
        return value


def check_metrics(metrics: Any, where: str) -> dict[str, Any]:
    """Metrics go into JSON as they are: a dict of strings to finite numbers, strings, lists, dicts."""
    if not isinstance(metrics, dict) or not all(isinstance(key, str) for key in metrics):
        raise ManifestError(f"{where}: metrics must be a dict with string keys, got {type(metrics).__name__}")
    try:
        return json.loads(json.dumps(metrics, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ManifestError(f"{where}: metrics are not JSON-serialisable (NaN/inf are not allowed): {error}") from None
