"""TRACE data: the JSON layout, validated on load, from a local folder or an S3 prefix.

Layout under a root (a path, ``file://path`` or ``s3://bucket/prefix``)::

    <root>/<task>/{train,eval,test}.json   a JSON list of {"prompt": str, "answer": str}
    <root>/<task>/labels.json              classification tasks only: a JSON list of label strings

Every error names the file (path or URI) and, for a bad row, its index. ``validate_tasks``
checks a whole task order before any training starts and reports every problem at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..registry.errors import InvalidURIError, ObjectNotFoundError, StorageError
from ..registry.storage import LocalStorage, open_storage

TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
STANDARD_CL_TASKS = ["agnews", "amazon", "yelp", "dbpedia", "yahoo", "MNLI", "QQP", "RTE", "SST-2", "WiC",
                     "CB", "COPA", "BoolQA", "MultiRC", "IMDB"]
SPLITS = ("train", "eval", "test")
LABELS_FILE = "labels.json"

# Splits known to be absent from a copy of the data, and what to tell the user. A copy that
# has the file loads it normally; one that lacks it never gets another split in its place.
KNOWN_GAPS = {
    ("MeetingBank", "train"): (
        "this copy of the data has no MeetingBank train split (the file was too large to be carried "
        "with it; MeetingBank has eval and test only here). No other split is substituted: leave "
        "MeetingBank out of the training order, or point the root at a copy that has train.json"
    ),
}

__all__ = [
    "KNOWN_GAPS", "SPLITS", "STANDARD_CL_TASKS", "TRACE_ORDER", "TraceDataError", "TraceExample",
    "available_tasks", "load_labels", "load_split", "validate_tasks",
]


class TraceDataError(ValueError):
    """TRACE data is missing or malformed; the message names the file (and row) at fault."""


@dataclass(frozen=True)
class TraceExample:
    prompt: str
    answer: str


# -- storage: a local folder or an S3 prefix, through the registry's storage backends -------
class _DataRoot:
    """A TRACE data root read through ``registry.storage`` (one S3 client setup, one error
    translation for the whole platform); ``read`` returns None for a missing file so that the
    caller can say which splits the task does have."""

    def __init__(self, root: str | Path):
        try:
            self.storage = open_storage(root)
        except InvalidURIError as error:
            raise TraceDataError(f"TRACE data root: {error}") from None

    def _key(self, parts: tuple[str, ...]) -> str:
        if any(not part or "/" in part or part in (".", "..") for part in parts):
            raise TraceDataError(f"{'/'.join(parts)!r}: not a task folder or file name")
        return "/".join(parts)

    def where(self, *parts: str) -> str:
        if isinstance(self.storage, LocalStorage):  # the path as a user types it, not a file:// URI
            return str(self.storage.root.joinpath(*parts))
        return self.storage.where(self._key(parts)) if parts else self.storage.uri

    def read(self, *parts: str) -> bytes | None:
        try:
            return self.storage.read(self._key(parts))
        except ObjectNotFoundError:
            return None
        except StorageError as error:
            raise TraceDataError(str(error)) from None  # it names the object

    def exists(self, *parts: str) -> bool:
        try:
            return self.storage.exists(self._key(parts))
        except StorageError:
            return False

    def has_task(self, task: str) -> bool:
        return bool(self._children(task))

    def tasks(self) -> list[str]:
        if isinstance(self.storage, LocalStorage) and not self.storage.root.is_dir():
            raise TraceDataError(f"TRACE data root {self.storage.root} does not exist or is not a folder")
        return [name for name in self._children() if any(n.endswith(".json") for n in self._children(name))]

    def _children(self, *parts: str) -> list[str]:
        try:
            return self.storage.children(self._key(parts) if parts else "")
        except StorageError as error:
            raise TraceDataError(str(error)) from None


# -- parsing ---------------------------------------------------------------------------------
def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise TraceDataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise TraceDataError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err


def _parse_examples(raw: bytes, where: str) -> list[TraceExample]:
    rows = _parse_json(raw, where)
    if not isinstance(rows, list):
        raise TraceDataError(f"{where}: expected a JSON list of {{\"prompt\", \"answer\"}} objects, "
                             f"got a JSON {type(rows).__name__}")
    if not rows:
        raise TraceDataError(f"{where}: contains no examples")
    return [_parse_row(row, where, index) for index, row in enumerate(rows)]


def _parse_row(row: Any, where: str, index: int) -> TraceExample:
    if not isinstance(row, dict):
        raise TraceDataError(f"{where}: row {index}: expected an object with \"prompt\" and \"answer\", "
                             f"got a JSON {type(row).__name__}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise TraceDataError(f"{where}: row {index}: missing \"{key}\"")
        if not isinstance(row[key], str):
            raise TraceDataError(f"{where}: row {index}: \"{key}\" must be a string, "
                                 f"got {type(row[key]).__name__}")
    return TraceExample(prompt=row["prompt"], answer=row["answer"])


def _parse_labels(raw: bytes, where: str) -> list[str]:
    labels = _parse_json(raw, where)
    if not isinstance(labels, list) or not labels:
        raise TraceDataError(f"{where}: expected a non-empty JSON list of label strings")
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            raise TraceDataError(f"{where}: entry {index}: expected a label string, got {type(label).__name__}")
    return labels


# -- public API ------------------------------------------------------------------------------
def available_tasks(root: str | Path) -> list[str]:
    """The task folders under ``root``, sorted."""
    return _DataRoot(root).tasks()


def _unknown_task_error(store, task: str) -> TraceDataError:
    return TraceDataError(f"{store.where(task)}: unknown task {task!r}; available under {store.where()}: "
                          f"{', '.join(store.tasks()) or '(none)'}")


def _missing_split_error(store, task: str, split: str) -> TraceDataError:
    if not store.has_task(task):
        return _unknown_task_error(store, task)
    where = store.where(task, f"{split}.json")
    if (task, split) in KNOWN_GAPS:
        return TraceDataError(f"{where}: {KNOWN_GAPS[task, split]}")
    present = [s for s in SPLITS if store.exists(task, f"{s}.json")]
    return TraceDataError(f"{where}: task {task!r} has no {split!r} split; it has: {', '.join(present) or '(none)'}")


def _read_split(store, task: str, split: str) -> list[TraceExample]:
    if split not in SPLITS:
        raise TraceDataError(f"unknown split {split!r} for task {task!r}; choose one of {', '.join(SPLITS)}")
    raw = store.read(task, f"{split}.json")
    if raw is None:
        raise _missing_split_error(store, task, split)
    return _parse_examples(raw, store.where(task, f"{split}.json"))


def load_split(root: str | Path, task: str, split: str, *,
               max_examples: int | None = None) -> list[TraceExample]:
    """The examples of ``<root>/<task>/<split>.json``, validated, in file order.

    ``max_examples`` keeps the first n (deterministic); the whole file is still validated.
    An ``s3://`` root is read with boto3's standard chain (the registry's S3 backend).
    """
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples: must be a positive integer or None, got {max_examples!r}")
    examples = _read_split(_DataRoot(root), task, split)
    return examples[:max_examples] if max_examples is not None else examples


def load_labels(root: str | Path, task: str) -> list[str] | None:
    """The label strings of a classification task (``labels.json``), or None where it has none."""
    store = _DataRoot(root)
    raw = store.read(task, LABELS_FILE)
    return None if raw is None else _parse_labels(raw, store.where(task, LABELS_FILE))


def validate_tasks(root: str | Path, tasks: Iterable[str], splits: Sequence[str] = SPLITS) -> dict[str, dict[str, int]]:
    """Check every ``(task, split)`` file (and ``labels.json`` where present) before any work.

    Returns ``{task: {split: number of examples}}``. Raises one ``TraceDataError`` listing every
    problem found, so a bad order is fixed in one go rather than one failed run at a time.
    """
    store = _DataRoot(root)
    counts: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for task in tasks:
        counts[task] = {}
        if not store.has_task(task):
            problems.append(str(_unknown_task_error(store, task)))
            continue
        for split in splits:
            try:
                counts[task][split] = len(_read_split(store, task, split))
            except TraceDataError as err:
                problems.append(str(err))
        raw_labels = store.read(task, LABELS_FILE)
        if raw_labels is not None:
            try:
                _parse_labels(raw_labels, store.where(task, LABELS_FILE))
            except TraceDataError as err:
                problems.append(str(err))
    if problems:
        raise TraceDataError(f"{len(problems)} problem(s) with the TRACE data under {store.where()}:\n- "
                             + "\n- ".join(problems))
    return counts
