"""The memory registry: a run's rank-1 atoms as immutable shards + JSON version manifests in
object storage (a local directory or any S3-compatible endpoint).

The Ray actor that fronts it lives in ``moram_platform.registry.actor`` (imported on demand,
so the CLI and plain users do not pay for importing Ray).
"""
from .errors import (CommitConflictError, CommitError, InvalidNameError, InvalidURIError, LeaseHeldError,
                     LeaseLostError, ManifestError, ObjectNotFoundError, RegistryError, ShardIntegrityError,
                     StorageError, VersionNotFoundError)
from .layout import manifest_key, shard_key
from .lease import RunLease
from .manifest import SCHEMA_VERSION, BaseModelRef, ShardRef, Version
from .names import check_name
from .registry import DEFAULT_REGISTRY_URI, REGISTRY_URI_ENV, Registry, default_registry_uri
from .storage import LocalStorage, S3Storage, Storage, open_storage

__all__ = [
    "DEFAULT_REGISTRY_URI", "REGISTRY_URI_ENV", "SCHEMA_VERSION",
    "BaseModelRef", "Registry", "RunLease", "ShardRef", "Version",
    "LocalStorage", "S3Storage", "Storage", "open_storage",
    "check_name", "default_registry_uri", "manifest_key", "shard_key",
    "CommitConflictError", "CommitError", "InvalidNameError", "InvalidURIError", "LeaseHeldError", "LeaseLostError",
    "ManifestError",
    "ObjectNotFoundError", "RegistryError", "ShardIntegrityError", "StorageError", "VersionNotFoundError",
]
