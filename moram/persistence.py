"""Shards: one task's atoms (every layer) plus their activation statistics, as safetensors.

Layout of a shard (safetensors, never pickle):
    layers.<module>.A             [n, d_in]   keys of the kept atoms
    layers.<module>.B             [d_out, n]  values, scale alpha/r baked in (unscaled when the
                                              config's frozen_scale is "official")
    layers.<module>.mass          [n]         activation mass of the kept atoms over the task
    layers.<module>.routing_mass  [R]         mass of every atom routed during the task
    layers.<module>.kept          [n]         indices of the kept atoms in the task's block
    layers.<module>.<name>        [rows, d_in] each of the method's per-task tensors
                                              (``Method.task_tensors``): MoE-LoRA's "router"
                                              [1, d_in], the task expert's gate key
metadata (strings): format, format_version, content_sha256 (over every tensor's name, dtype,
shape and bytes, checked on every read), task, task_index, method, mode ("append": the atoms
join the bank; "replace": SeqLoRA's shard is the whole adapter; the method's ``shard_mode``),
config (JSON), added (JSON).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

SHARD_FORMAT = "moram-shard"
SHARD_FORMAT_VERSION = 1
_LAYER_PREFIX = "layers."


class ShardError(ValueError):
    """A shard cannot be used: missing, truncated, altered, or from an incompatible writer."""


@dataclass
class Shard:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    name: str = "<bytes>"

    @property
    def layer_names(self) -> list[str]:
        names = {key[len(_LAYER_PREFIX):].rsplit(".", 1)[0] for key in self.tensors}
        return sorted(names)

    def layer(self, name: str) -> dict[str, torch.Tensor]:
        prefix = f"{_LAYER_PREFIX}{name}."
        return {key[len(prefix):]: t for key, t in self.tensors.items() if key.startswith(prefix)}

    @property
    def atom_counts(self) -> dict[str, int]:
        return {name: self.layer(name)["A"].shape[0] for name in self.layer_names}

    @property
    def mode(self) -> str:
        return self.metadata["mode"]


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def shard_to_bytes(blocks: dict[str, dict[str, torch.Tensor]], metadata: dict[str, Any]) -> bytes:
    """Serialise per-layer tensors (``blocks[layer][field]``) and metadata into one shard."""
    tensors = {
        f"{_LAYER_PREFIX}{layer}.{field}": t.detach().contiguous().cpu()
        for layer, fields in blocks.items() for field, t in fields.items() if t is not None
    }
    header = {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
              for key, value in metadata.items()}
    header.update(format=SHARD_FORMAT, format_version=str(SHARD_FORMAT_VERSION),
                  content_sha256=content_sha256(tensors))
    return _canonical_header(save_safetensors(tensors, metadata=header))


def _canonical_header(data: bytes) -> bytes:
    """Re-write the safetensors header with sorted keys: the same atoms always give the same
    bytes (and file sha256). safetensors itself emits its metadata in hash-map order."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(header)) + header + data[8 + length:]


def read_shard(source: str | Path | bytes, name: str | None = None) -> Shard:
    """Parse and verify a shard from a path or bytes; every failure is a ShardError naming it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        name = name or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"shard {name}: file not found") from None
    metadata = _header_metadata(data, name)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types
        raise ShardError(f"shard {name}: unreadable safetensors data ({error})") from None
    if content_sha256(tensors) != metadata.get("content_sha256"):
        raise ShardError(f"shard {name}: content checksum mismatch (the file was altered or corrupted)")
    shard = Shard(tensors=tensors, metadata=metadata, name=name)
    _check_layers(shard)
    return shard


def _header_metadata(data: bytes, name: str) -> dict[str, Any]:
    """Read the safetensors JSON header ourselves: cheap, and a clear error when it is broken."""
    if len(data) < 8:
        raise ShardError(f"shard {name}: truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ShardError(f"shard {name}: truncated (header of {header_len} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8:8 + header_len])
        raw = header["__metadata__"]
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"shard {name}: not a MoRAM shard (unreadable safetensors header)") from None
    if raw.get("format") != SHARD_FORMAT:
        raise ShardError(f"shard {name}: not a MoRAM shard (format={raw.get('format')!r})")
    version = int(raw.get("format_version", "0"))
    if version > SHARD_FORMAT_VERSION:
        raise ShardError(f"shard {name}: format version {version} is newer than this moram "
                         f"({SHARD_FORMAT_VERSION}); upgrade moram to read it")
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value) if key in ("config", "added", "task_index") else value
        except ValueError:
            raise ShardError(f"shard {name}: metadata field {key!r} is not valid JSON") from None
    for key in ("task", "task_index", "method", "mode", "config"):
        if key not in metadata:
            raise ShardError(f"shard {name}: metadata lacks {key!r}")
    if metadata["mode"] not in ("append", "replace"):
        raise ShardError(f"shard {name}: unknown mode {metadata['mode']!r}")
    return metadata


def _check_layers(shard: Shard) -> None:
    for layer in shard.layer_names:
        fields = shard.layer(layer)
        missing = [f for f in ("A", "B", "mass") if f not in fields]
        if missing:
            raise ShardError(f"shard {shard.name}: layer {layer} lacks {missing}")
        n = fields["A"].shape[0]
        if fields["B"].shape[1] != n or fields["mass"].shape[0] != n:
            raise ShardError(f"shard {shard.name}: layer {layer} has inconsistent atom counts")
