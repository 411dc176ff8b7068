"""Where things live under a registry root (local directory or s3://bucket/prefix):

    <run>/shards/<sha256>.safetensors     one immutable shard per task, named by its content
    <run>/versions/<version:08d>.json     one manifest per version; version v holds tasks 0..v-1

A version's key is computed from its number, so a commit reads its parent's manifest and
never lists the run: commit cost does not grow with the number of versions.
"""
from .names import check_name

VERSION_DIGITS = 8


def shard_key(run_id: str, sha256: str) -> str:
    return f"{check_name('run', run_id)}/shards/{sha256}.safetensors"


def versions_prefix(run_id: str) -> str:
    return f"{check_name('run', run_id)}/versions"


def manifest_key(run_id: str, version: int) -> str:
    return f"{versions_prefix(run_id)}/{version:0{VERSION_DIGITS}d}.json"


def version_from_name(name: str) -> int | None:
    """The version number of a manifest file name, None for anything else in the folder."""
    stem, dot, suffix = name.partition(".")
    if suffix != "json" or len(stem) != VERSION_DIGITS or not stem.isdigit():
        return None
    return int(stem)
