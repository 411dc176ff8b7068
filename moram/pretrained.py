"""PEFT-style persistence of a trained memory: only the atoms, never the base weights.

    save_pretrained(model, "fomc-memory")                          # after end_task()
    model = from_pretrained(base_model, "fomc-memory", delta=0.3)  # a fresh base model + the atoms

A saved folder holds ``moram_config.json`` (the MoRAM config, the task names, the base model's
id and revision, the shard files with their sha256) and ``atoms/task-<i>.safetensors``, one
verified shard per task in task order (``moram.persistence``). ``from_pretrained`` also reads a
``moram-registry export`` folder (``manifest.json`` + ``shards/<sha256>.safetensors``) and any
*memory source*: an object with ``load_memory() -> PretrainedMemory`` (the platform's
``moram_platform.generation.RegistrySpec`` reads a registry version this way; this package
never imports the platform).

Why the shards and not the frozen bank: a shard carries its task's activation statistics
(the pruning view needs them) and the frozen bank does not, so a model writes the shards it
was loaded from plus the ones it finished since (``MoRAMModel.export_shard`` gives only the
last task's). A model that trained several tasks in one process without saving in between
must be given its shards (``shards=[...]``, e.g. the bytes each ``export_shard()`` returned).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from .config import MoRAMConfig, MoRAMConfigError
from .persistence import read_shard

if TYPE_CHECKING:
    from torch import nn

    from .model import MoRAMModel

CONFIG_FILE = "moram_config.json"
ATOMS_DIR = "atoms"
EXPORT_MANIFEST = "manifest.json"          # a `moram-registry export` folder
PRETRAINED_FORMAT, PRETRAINED_FORMAT_VERSION = "moram-pretrained", 1
_SHARDS_ATTRIBUTE = "_moram_task_shards"   # the shard bytes a model was loaded from / saved with


class PretrainedError(ValueError):
    """A saved memory cannot be used: missing files, wrong base model, unreadable config."""


@dataclass
class PretrainedMemory:
    """What a trained memory is, wherever it is stored: the method config, one shard per task
    in task order, and the base model the atoms belong to."""

    config: dict[str, Any]
    shards: list[bytes]
    tasks: list[str]
    base_model_id: str | None = None
    base_model_revision: str | None = None
    where: str = "<memory>"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class MemorySource(Protocol):
    def load_memory(self) -> PretrainedMemory: ...


# -- saving ----------------------------------------------------------------------------------
def save_pretrained(model: "MoRAMModel", save_directory: str | os.PathLike, *,
                    shards: Sequence[bytes] | None = None, base_model_id: str | None = None,
                    base_model_revision: str | None = None) -> Path:
    """Write the model's atoms (one shard per finished task) and a small JSON config into
    ``save_directory``; base weights are never written. Returns the folder."""
    task_shards = list(shards) if shards is not None else task_shard_bytes(model)
    tasks = [read_shard(data, name=f"shard of task {i}").metadata["task"] for i, data in enumerate(task_shards)]
    if tasks != list(model.task_names):
        raise PretrainedError(f"save_pretrained: the shards hold tasks {tasks}, the model has finished "
                              f"{list(model.task_names)}")
    memory = PretrainedMemory(config=moram_config_of(model).to_dict(), shards=task_shards, tasks=tasks,
                              base_model_id=base_model_id or _base_model_id(model),
                              base_model_revision=base_model_revision)
    folder = write_memory(memory, save_directory)
    _remember_shards(model, task_shards)
    return folder


def write_memory(memory: PretrainedMemory, save_directory: str | os.PathLike) -> Path:
    """Write a memory in the save_pretrained layout (e.g. a registry version, to ship it)."""
    folder = Path(save_directory)
    (folder / ATOMS_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (task, data) in enumerate(zip(memory.tasks, memory.shards)):
        name = f"{ATOMS_DIR}/task-{index:03d}.safetensors"
        (folder / name).write_bytes(data)
        entries.append({"file": name, "task": task, "sha256": hashlib.sha256(data).hexdigest()})
    document = {
        "format": PRETRAINED_FORMAT, "format_version": PRETRAINED_FORMAT_VERSION,
        "moram_config": memory.config,
        "tasks": list(memory.tasks),
        "base_model": {"id": memory.base_model_id, "revision": memory.base_model_revision},
        "shards": entries,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2))  # last: marks a complete save
    return folder


def task_shard_bytes(model: "MoRAMModel") -> list[bytes]:
    """One shard per finished task: those the model was loaded or saved with, plus the task it
    finished since (``export_shard``). Earlier tasks cannot be rebuilt from the frozen bank."""
    known = list(getattr(model, _SHARDS_ATTRIBUTE, None) or [])
    finished = len(model.task_names)
    if len(known) == finished - 1:
        try:
            known.append(model.export_shard())
        except RuntimeError:  # loaded with load_shards(): nothing finished in this process
            pass
    if len(known) != finished:
        raise PretrainedError(
            f"save_pretrained: the model finished {finished} tasks but can re-export only the last one; "
            f"pass shards=[...] (the bytes each export_shard() returned, in task order) or save after each task")
    return known


def moram_config_of(model: "MoRAMModel") -> MoRAMConfig:
    """The model's MoRAMConfig (the one place that knows which attribute holds it)."""
    for name in ("moram_config", "config"):
        value = getattr(model, name, None)
        if isinstance(value, MoRAMConfig):
            return value
    raise TypeError(f"{type(model).__name__} carries no MoRAMConfig; expected a MoRAMModel")


def _base_model_id(model: "MoRAMModel") -> str | None:
    inner = getattr(model, "model", None)
    config = getattr(inner, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _remember_shards(model: "MoRAMModel", shards: Sequence[bytes]) -> None:
    object.__setattr__(model, _SHARDS_ATTRIBUTE, list(shards))  # plain attribute, not a module state


# -- loading ---------------------------------------------------------------------------------
def from_pretrained(base_model: "nn.Module", source: str | os.PathLike | MemorySource | PretrainedMemory, *,
                    delta: float | None = None, prune_mass: float | None = None,
                    base_model_revision: str | None = None) -> "MoRAMModel":
    """Wrap ``base_model`` (in place) with the atoms of ``source``, in eval mode.

    ``source``: a ``save_pretrained`` folder, a ``moram-registry export`` folder, or a memory
    source (``load_memory()``). ``delta`` and ``prune_mass`` are views applied at load time
    (Eq. 8's threshold; keep each task's atoms covering that share of its activation mass).
    ``base_model_revision``: the given base model's revision (e.g. ``model_fingerprint(path)``);
    a memory that records another revision is refused.
    """
    from .model import get_moram_model

    memory = load_memory(source)
    check_base_model(memory, base_model_revision)
    try:
        config = MoRAMConfig.from_dict(memory.config)
        views = {key: value for key, value in {"delta": delta, "prune_mass": prune_mass}.items() if value is not None}
        config = config.replace(**views)
    except (MoRAMConfigError, TypeError) as error:
        raise PretrainedError(f"{memory.where}: invalid MoRAM config: {error}") from None
    shards = [read_shard(data, name=f"{memory.where} task {i}") for i, data in enumerate(memory.shards)]
    model = get_moram_model(base_model, config)
    model.load_shards(shards, prune_mass=prune_mass)
    _remember_shards(model, memory.shards)
    return model.eval()


def check_base_model(memory: PretrainedMemory, revision: str | None) -> None:
    if revision and memory.base_model_revision and revision != memory.base_model_revision:
        raise PretrainedError(
            f"{memory.where}: trained on base model {memory.base_model_id!r} (revision "
            f"{memory.base_model_revision}), but the given base model has revision {revision}")


def load_memory(source: str | os.PathLike | MemorySource | PretrainedMemory) -> PretrainedMemory:
    """The memory a folder or memory source holds, every shard present and checked."""
    if isinstance(source, PretrainedMemory):
        return source
    if isinstance(source, MemorySource):
        return source.load_memory()
    folder = Path(source).expanduser()
    if (folder / CONFIG_FILE).is_file():
        return _read_saved(folder)
    if (folder / EXPORT_MANIFEST).is_file():
        return _read_export(folder)
    if not folder.is_dir():
        raise PretrainedError(f"{folder}: no such folder")
    raise PretrainedError(f"{folder}: not a saved MoRAM memory: it has neither {CONFIG_FILE} (save_pretrained) "
                          f"nor {EXPORT_MANIFEST} (moram-registry export)")


def _read_saved(folder: Path) -> PretrainedMemory:
    document = _read_json(folder / CONFIG_FILE)
    if document.get("format") != PRETRAINED_FORMAT:
        raise PretrainedError(f"{folder / CONFIG_FILE}: not a MoRAM config (format={document.get('format')!r})")
    if int(document.get("format_version", 0)) > PRETRAINED_FORMAT_VERSION:
        raise PretrainedError(f"{folder / CONFIG_FILE}: format version {document['format_version']} is newer "
                              "than this moram; upgrade moram to read it")
    try:
        entries, base = document["shards"], document.get("base_model") or {}
        shards = [_read_file(folder, entry["file"], entry["sha256"]) for entry in entries]
        return PretrainedMemory(config=document["moram_config"], shards=shards, tasks=list(document["tasks"]),
                                base_model_id=base.get("id"), base_model_revision=base.get("revision"),
                                where=str(folder))
    except (KeyError, TypeError) as error:
        raise PretrainedError(f"{folder / CONFIG_FILE}: malformed (missing {error})") from None


def _read_export(folder: Path) -> PretrainedMemory:
    manifest = _read_json(folder / EXPORT_MANIFEST)
    try:
        refs, base = manifest["shards"], manifest["base_model"]
        shards = [_read_file(folder, f"shards/{ref['sha256']}.safetensors", ref["sha256"]) for ref in refs]
        return PretrainedMemory(config=manifest["config"], shards=shards, tasks=[ref["task"] for ref in refs],
                                base_model_id=base.get("id"), base_model_revision=base.get("revision"),
                                where=f"{folder} (run {manifest.get('run_id')} version {manifest.get('version')})")
    except (KeyError, TypeError) as error:
        raise PretrainedError(f"{folder / EXPORT_MANIFEST}: malformed manifest (missing {error})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PretrainedError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(document, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return document


def _read_file(folder: Path, name: str, sha256: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise PretrainedError(f"{folder}: the weights file {name} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise PretrainedError(f"{path}: sha256 does not match the recorded one (altered or truncated)")
    return data


__all__ = ["CONFIG_FILE", "MemorySource", "PretrainedError", "PretrainedMemory", "from_pretrained", "load_memory",
           "moram_config_of", "save_pretrained", "task_shard_bytes", "write_memory"]
