"""Storage backends of the memory registry behind one small interface.

Keys are '/'-separated relative paths built by the registry from checked names. Two write
primitives carry the commit protocol:
  * ``write``  replaces an object whole (readers never see a partial object);
  * ``create`` is create-only and atomic: of two concurrent creators exactly one succeeds.

``open_storage(uri)`` picks the backend: a path or ``file://...`` -> LocalStorage,
``s3://bucket/prefix`` -> S3Storage (endpoint and credentials from the standard AWS chain,
e.g. AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE).
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..credentials import redact
from .errors import InvalidURIError, ObjectNotFoundError, StorageError


class Storage(ABC):
    """A flat key -> bytes store with whole-object writes and an atomic create-only put."""

    #: Where the store lives, safe to print (never contains credentials).
    uri: str

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if it does not exist."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Create or replace the object whole."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Create the object only if the key is free; False (nothing written) if it exists."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Sorted names of the objects and sub-prefixes directly under ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    def where(self, key: str) -> str:
        """The key's full location, for messages."""
        return f"{self.uri.rstrip('/')}/{key}"


def open_storage(uri: str | os.PathLike) -> Storage:
    """The backend a registry URI names: a path, ``file://...`` or ``s3://bucket/prefix``."""
    kind, where, prefix = _location(uri)
    return LocalStorage(where) if kind == "local" else S3Storage(where, prefix)


def check_uri(uri: str | os.PathLike) -> None:
    """Raise InvalidURIError unless ``uri`` names a backend; no I/O, no client (config validation)."""
    _location(uri)


def _location(uri: str | os.PathLike) -> tuple[str, Any, str]:
    """("local", path, "") or ("s3", bucket, prefix)."""
    if isinstance(uri, os.PathLike):
        return "local", Path(uri), ""
    if not isinstance(uri, str) or not uri:
        raise InvalidURIError(f"registry URI must be a non-empty string or path, got {uri!r}")
    if "://" not in uri:
        return "local", Path(uri), ""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"registry URI {redact(uri)!r}: file:// URIs name a local path (file:///abs/path)")
        return "local", Path(unquote(parsed.path)), ""
    if parsed.scheme == "s3":
        if not parsed.netloc or "@" in parsed.netloc:
            raise InvalidURIError(f"registry URI {redact(uri)!r}: expected s3://bucket/prefix")
        return "s3", parsed.netloc, parsed.path.strip("/")
    raise InvalidURIError(
        f"registry URI scheme {parsed.scheme!r} is not supported; use a path, file://... or s3://bucket/prefix")


def _checked_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")  # a bug in the caller, not bad input
    return path


# -- local directory ---------------------------------------------------------------------------
class LocalStorage(Storage):
    """A directory tree. Writes go to a hidden temp file first (fsynced), then are renamed
    into place (``write``) or hard-linked (``create``: link() fails if the name exists, so the
    create is atomic and the object is complete the moment it appears)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_checked_key(key).parts)

    def read(self, key: str) -> bytes:
        with self._errors("read", key):
            return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        with self._errors("write", key), self._temp_file(key, data) as temp:
            os.replace(temp, self._path(key))
            _fsync_dir(temp.parent)

    def create(self, key: str, data: bytes) -> bool:
        with self._errors("create", key), self._temp_file(key, data) as temp:
            try:
                os.link(temp, self._path(key))
            except FileExistsError:
                return False
            _fsync_dir(temp.parent)
            return True

    def exists(self, key: str) -> bool:
        with self._errors("stat", key):
            return self._path(key).is_file()

    def children(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix else self.root
        with self._errors("list", prefix):
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted(name for name in names if not name.startswith("."))  # skip temp files

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _temp_file(self, key: str, data: bytes) -> Iterator[Path]:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            yield temp
        finally:
            temp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.where(key)}: not found") from None
        except OSError as error:
            raise StorageError(f"{self.where(key)}: {operation} failed: {error.strerror or error}") from None


def _fsync_dir(folder: Path) -> None:
    # Makes the new directory entry durable: a version must not vanish after a power cut.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- S3 ----------------------------------------------------------------------------------------
class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix`` of any S3-compatible endpoint, through boto3.

    The endpoint URL, region and credentials come from boto3's standard chain (environment,
    ~/.aws/config, instance roles); none of them is stored here or printed.
    """

    _CONDITIONAL_CONFLICT_RETRIES = 5

    def __init__(self, bucket: str, prefix: str = "", session: boto3.session.Session | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._session = session if session is not None else boto3.session.Session()
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60)
        self.client = self._session.client("s3", config=config)

    def _key(self, key: str) -> str:
        _checked_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str) -> bytes:
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        # If-None-Match: * makes the server refuse the put when the key exists (412). A 409
        # means a concurrent conditional put was in flight: retry, one of them has won by then.
        for attempt in range(self._CONDITIONAL_CONFLICT_RETRIES):
            try:
                with self._errors("create", key, passthrough=("PreconditionFailed", "ConditionalRequestConflict")):
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as error:
                if _error_code(error) == "PreconditionFailed":
                    return False
                time.sleep(0.05 * (attempt + 1))
        raise StorageError(f"{self.where(key)}: create failed: the conditional put kept conflicting")

    def exists(self, key: str) -> bool:
        try:
            with self._errors("stat", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ObjectNotFoundError:
            return False

    def children(self, prefix: str) -> list[str]:
        full = f"{self._key(prefix)}/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        names: set[str] = set()
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                names.update(item["Key"][len(full):] for item in page.get("Contents", []))
                names.update(item["Prefix"][len(full):].rstrip("/") for item in page.get("CommonPrefixes", []))
        return sorted(name for name in names if name)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str, passthrough: tuple[str, ...] = ()) -> Iterator[None]:
        """botocore errors -> registry errors whose message names the key, never a secret."""
        try:
            yield
        except ClientError as error:
            code = _error_code(error)
            if code in passthrough:
                raise
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(f"{self.where(key)}: not found") from None
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = error.response.get("Error", {}).get("Message", "")
            raise StorageError(self._redact(
                f"{self.where(key)}: {operation} failed: {code} (HTTP {status}) {message}".rstrip())) from None
        except BotoCoreError as error:  # unreachable endpoint, timeouts, missing credentials...
            raise StorageError(self._redact(
                f"{self.where(key)}: {operation} failed: {type(error).__name__}: {error}")) from None

    def _redact(self, text: str) -> str:
        # Some S3-compatible servers echo the access key in error messages.
        try:
            credentials = self._session.get_credentials()
        except BotoCoreError:
            return text
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            for secret in (frozen.access_key, frozen.secret_key, frozen.token):
                if secret:
                    text = text.replace(secret, "***")
        return text


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
