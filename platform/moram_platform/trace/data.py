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


# -- storage: a local folder or an S3 prefix ------------------------------------------------
class _LocalRoot:
    def __init__(self, path: Path):
        self.path = path

    def where(self, *parts: str) -> str:
        return str(self.path.joinpath(*parts))

    def read(self, *parts: str) -> bytes | None:
        file = self.path.joinpath(*parts)
        return file.read_bytes() if file.is_file() else None

    def exists(self, *parts: str) -> bool:
        return self.path.joinpath(*parts).is_file()

    def has_task(self, task: str) -> bool:
        return (self.path / task).is_dir()

    def tasks(self) -> list[str]:
        if not self.path.is_dir():
            raise TraceDataError(f"TRACE data root {self.path} does not exist or is not a folder")
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and any(p.glob("*.json")))


class _S3Root:
    """Reads single JSON objects (get_object); lists only to explain a missing task."""

    def __init__(self, uri: str, client=None):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise TraceDataError(f"TRACE data root {uri!r}: expected s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3  # the standard AWS chain: env variables, config files, instance roles

            self._client = boto3.client("s3")
        return self._client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def where(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self._key(*parts)}"

    def read(self, *parts: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(*parts))["Body"].read()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise TraceDataError(f"{self.where(*parts)}: cannot read ({code or err})") from err

    def exists(self, *parts: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(*parts))
            return True
        except ClientError:
            return False

    def has_task(self, task: str) -> bool:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(task) + "/", MaxKeys=1)
        return listed.get("KeyCount", 0) > 0

    def tasks(self) -> list[str]:
        prefix = self._key() + "/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        names = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)


def _open_root(root: str | Path, s3_client=None) -> _LocalRoot | _S3Root:
    if isinstance(root, str) and root.startswith("s3://"):
        return _S3Root(root, s3_client)
    if isinstance(root, str) and root.startswith("file://"):
        root = root[len("file://"):]
    return _LocalRoot(Path(root))


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
def available_tasks(root: str | Path, *, s3_client=None) -> list[str]:
    """The task folders under ``root``, sorted."""
    return _open_root(root, s3_client).tasks()


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


def load_split(root: str | Path, task: str, split: str, *, max_examples: int | None = None,
               s3_client=None) -> list[TraceExample]:
    """The examples of ``<root>/<task>/<split>.json``, validated, in file order.

    ``max_examples`` keeps the first n (deterministic); the whole file is still validated.
    ``s3_client`` overrides the default ``boto3.client("s3")`` for ``s3://`` roots.
    """
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples: must be a positive integer or None, got {max_examples!r}")
    examples = _read_split(_open_root(root, s3_client), task, split)
    return examples[:max_examples] if max_examples is not None else examples


def load_labels(root: str | Path, task: str, *, s3_client=None) -> list[str] | None:
    """The label strings of a classification task (``labels.json``), or None where it has none."""
    store = _open_root(root, s3_client)
    raw = store.read(task, LABELS_FILE)
    return None if raw is None else _parse_labels(raw, store.where(task, LABELS_FILE))


def validate_tasks(root: str | Path, tasks: Iterable[str], splits: Sequence[str] = SPLITS, *,
                   s3_client=None) -> dict[str, dict[str, int]]:
    """Check every ``(task, split)`` file (and ``labels.json`` where present) before any work.

    Returns ``{task: {split: number of examples}}``. Raises one ``TraceDataError`` listing every
    problem found, so a bad order is fixed in one go rather than one failed run at a time.
    """
    store = _open_root(root, s3_client)
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
