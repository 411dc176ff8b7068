"""Evaluation records: a version's scores on every task of the order, per evaluation profile.

    <run>/evaluations/<version:08d>-<profile>.json

Written create-only once per (version, profile): the accuracy matrix of a run is rebuilt from
storage on resume without evaluating anything twice. Version 0 is the base model (the zero-shot
row). A record is data about a version, never part of it: versions stay immutable.
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
    return f"{check_name('run', run_id)}/evaluations/{version:0{VERSION_DIGITS}d}-{check_name('profile', profile)}.json"


def record_evaluation(registry: Registry, run_id: str, version: int, profile: str,
                      scores: dict[str, Any]) -> dict[str, Any]:
    """Store ``scores`` ({task: {"metric", "score", ...}}) for the version; the first record wins."""
    record = {"run_id": run_id, "version": version, "profile": profile, "scores": scores,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    key = evaluation_key(run_id, version, profile)
    if registry.storage.create(key, json.dumps(record, indent=1, sort_keys=True).encode()):
        return record
    return read_evaluation(registry, run_id, version, profile)


def read_evaluation(registry: Registry, run_id: str, version: int, profile: str) -> dict[str, Any] | None:
    key = evaluation_key(run_id, version, profile)
    try:
        data = registry.storage.read(key)
    except ObjectNotFoundError:
        return None
    try:
        record = json.loads(data)
        record["scores"]
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"run {run_id} version {version}: evaluation record {registry.storage.where(key)} "
                            "is not a valid JSON record") from None
    return record
