"""Errors of the memory registry. Every message names the run, version, shard or key at
fault and never carries a credential."""
import errno
from typing import Callable


class RegistryError(Exception):
    """Base class of every error the memory registry raises."""


class InvalidNameError(RegistryError, ValueError):
    """A run or task name is empty, contains a path separator or '..', or uses other characters."""


class InvalidURIError(RegistryError, ValueError):
    """A registry URI names no supported backend (a path, ``file://...`` or ``s3://bucket/prefix``)."""


class StorageError(RegistryError):
    """The storage backend failed (unreachable endpoint, access denied, disk error...)."""


class ObjectNotFoundError(StorageError):
    """A key does not exist in the storage backend."""


class ManifestError(RegistryError):
    """A version manifest is not JSON, lacks a field, or has a schema newer than this code."""


class ShardIntegrityError(RegistryError):
    """A shard is missing, truncated, altered, or not a valid MoRAM shard."""


class VersionNotFoundError(RegistryError, LookupError):
    """The run has no such version."""


class CommitError(RegistryError):
    """A commit was refused before anything became visible (e.g. its parent version is missing)."""


class CommitConflictError(CommitError):
    """The task is already committed with different content; versions are immutable."""


class LeaseHeldError(RegistryError, ValueError):
    """Another driver holds the run's lease: two drivers must not work on one run at once."""


class LeaseLostError(RegistryError):
    """This driver's lease expired and another driver took the run over."""


def find_storage_error(error: BaseException) -> StorageError | None:
    """The StorageError behind ``error``, wherever Ray wrapped it (a remote task's error, a Ray
    Train worker's failure), else None: a job reports it as one line that names the key."""
    return find_cause(error, StorageError)


def find_disk_full(error: BaseException) -> OSError | None:
    """The "No space left on device" error behind ``error`` (a full run folder: checkpoints,
    logs, a local MLflow store), else None. pyarrow's file errors (Ray Train's checkpoint
    copies) carry no errno, only the message."""
    return find_cause(error, OSError, lambda e: e.errno == errno.ENOSPC or "No space left on device" in str(e))


def find_cause(error: BaseException, kind: type[BaseException],
               accept: Callable[[BaseException], bool] = lambda _: True) -> BaseException | None:
    """The first exception of type ``kind`` (and ``accept``ed) in ``error``'s causes and contexts,
    looking inside Ray's wrappers (RayTaskError.cause, Ray Train's worker and controller failures)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)   # a RayTaskError's original exception (its str is the traceback)
        if isinstance(cause, kind) and accept(cause):
            return cause
        if isinstance(current, kind) and accept(current):
            return current
        pending += [current.__cause__, current.__context__, cause, getattr(current, "_base_exc", None),
                    getattr(current, "controller_failure", None),
                    *getattr(current, "worker_failures", {}).values()]
    return None
