"""Evaluation records: a version's scores on tasks, per evaluation profile.

    <run>/evaluations/<version:08d>-<profile>/<task>.json      one per (version, profile, task)
    <run>/evaluations/<version:08d>-<profile>.json             older runs: all tasks in one record

Each is written create-only, the first record wins: the accuracy matrix of a run is rebuilt from
storage on resume without evaluating anything twice, and an evaluation stopped halfway keeps the
tasks it scored. A version's record is the union of both forms. Version 0 is the base model (the
zero-shot row). A record is data about a version, never part of it: versions stay immutable.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from .errors import ManifestError, ObjectNotFoundError
from .layout import VERSION_DIGITS
from .names import check_name
from .registry import Registry


def evaluation_key(run_id: str, version: int, profile: str) -> str:
    """The single-file record of older runs (all tasks of a version at once)."""
    return f"{_prefix(run_id, version, profile)}.json"


def task_evaluation_key(run_id: str, version: int, profile: str, task: str) -> str:
    return f"{_prefix(run_id, version, profile)}/{check_name('task', task)}.json"


def _prefix(run_id: str, version: int, profile: str) -> str:
    return f"{check_name('run', run_id)}/evaluations/{version:0{VERSION_DIGITS}d}-{check_name('profile', profile)}"


def record_task_evaluation(registry: Registry, run_id: str, version: int, profile: str, task: str,
                           result: dict[str, Any]) -> dict[str, Any]:
    """Store one task's result ({"metric", "score", ...}); the first record wins and is returned."""
    record = {"run_id": run_id, "version": version, "profile": profile, "task": task, "result": result,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    key = task_evaluation_key(run_id, version, profile, task)
    if registry.storage.create(key, json.dumps(record, indent=1, sort_keys=True).encode()):
        return result
    return _read_json(registry, key, run_id, version, "result")["result"]


def record_evaluation(registry: Registry, run_id: str, version: int, profile: str,
                      scores: dict[str, Any]) -> dict[str, Any]:
    """Store ``scores`` ({task: {"metric", "score", ...}}) for the version, a record per task;
    the version's whole record (what was recorded before wins)."""
    for task, result in scores.items():
        record_task_evaluation(registry, run_id, version, profile, task, result)
    return read_evaluation(registry, run_id, version, profile)


def read_evaluation(registry: Registry, run_id: str, version: int, profile: str) -> dict[str, Any] | None:
    """{"run_id", "version", "profile", "scores": {task: result}} over every recorded task, or
    None when the version has none under ``profile``."""
    scores: dict[str, Any] = {}
    try:
        whole = _read_json(registry, evaluation_key(run_id, version, profile), run_id, version, "scores")
        scores.update(whole["scores"])
    except ObjectNotFoundError:
        pass
    prefix = _prefix(run_id, version, profile)
    for name in registry.storage.children(prefix):
        if name.endswith(".json"):
            try:
                record = _read_json(registry, f"{prefix}/{name}", run_id, version, "result")
            except ObjectNotFoundError:
                continue
            scores.setdefault(record["task"], record["result"])
    if not scores:
        return None
    return {"run_id": run_id, "version": version, "profile": profile, "scores": scores}


def _read_json(registry: Registry, key: str, run_id: str, version: int, field: str) -> dict[str, Any]:
    data = registry.storage.read(key)
    try:
        record = json.loads(data)
        record[field]
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"run {run_id} version {version}: evaluation record {registry.storage.where(key)} "
                            "is not a valid JSON record") from None
    return record
